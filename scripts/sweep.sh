#!/usr/bin/env bash
# A grid of runs with one token budget and seed: attention kind x MoE on/off, one run directory each
# (out/sweep_<attn>_<moe|dense>). A failed run is reported and the sweep goes on; the exit status is 1 if any
# failed. A run stopped by SIGINT or SIGTERM (exit 130 or 143, after its checkpoint) stops the sweep with that status. Dense layers get UP_DIM=768 and MoE layers MOE_UP_DIM=256 x 3 active experts: the same active width.
# ATTNS takes any registered mixer kind (mha mqa gqa mla nsa hyena mamba; bimamba with --objective mlm); the
# speedrun families and the mixers at equal parameters have their own scripts (families_cpu.sh, mixers_cpu.py).
# Settings are environment variables; extra arguments go to every run.
#   ATTNS="mha gqa mla" MOES="0 1" MAX_ITERS=500 bash scripts/sweep.sh --device cpu
#   python -m llm.report out/sweep_* --out report/     # table and loss curves
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
for attn in ${ATTNS:-mha gqa mla}; do
  for moe in ${MOES:-0 1}; do
    name="${PREFIX:-sweep}_${attn}_$([ "$moe" = 1 ] && echo moe || echo dense)"
    echo "=== $name"
    python train.py \
        --attn "$attn" --n_head "${N_HEAD:-4}" --n_kv_heads "${N_KV_HEADS:-2}" \
        --kv_latent_dim "${KV_LATENT_DIM:-32}" --q_latent_dim "${Q_LATENT_DIM:-64}" --rope_head_dim "${ROPE_HEAD_DIM:-16}" \
        $([ "$moe" = 1 ] && echo --moe || echo --no_moe) \
        --n_exp "${N_EXP:-8}" --n_shared "${N_SHARED:-1}" --n_act "${N_ACT:-3}" \
        --up_dim "$([ "$moe" = 1 ] && echo "${MOE_UP_DIM:-256}" || echo "${UP_DIM:-768}")" \
        --non_linearity "${NON_LINEARITY:-swiglu}" --pos_emb "${POS_EMB:-rope}" --norm "${NORM:-rms}" \
        --dataset "${DATASET:-shakespeare_char}" --total_batch_size_str "${TOTAL_BATCH:-2**11}" \
        --batch_size "${BATCH_SIZE:-16}" --max_iters "${MAX_ITERS:-500}" --learning_rate "${LR:-1e-3}" \
        --seed "${SEED:-1337}" --eval --eval_interval "${EVAL_INTERVAL:-100}" --eval_iters "${EVAL_ITERS:-20}" \
        --out_dir "${OUT_DIR:-out}" --wandb_run_name "$name" "$@"
    status=$?
    if [ "$status" = 130 ] || [ "$status" = 143 ]; then
      echo "=== $name was interrupted (exit $status); stopping the sweep"
      exit "$status"
    fi
    if [ "$status" != 0 ]; then
      failed+=("$name")
      echo "=== $name failed; continuing"
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed runs: ${failed[*]}"
  exit 1
fi
echo "all runs finished"
