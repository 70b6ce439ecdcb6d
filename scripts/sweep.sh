#!/usr/bin/env bash
# The attention x MoE grid through python -m llm.sweep: ATTNS (any registered mixer kind) x MOES (0: dense, 1: MoE),
# one token budget and seed, run directories OUT_DIR/PREFIX/<dense|moe>.attn-<kind>. Dense layers get UP_DIM=768
# and MoE layers MOE_UP_DIM=256 x 3 active experts: the same active width. Rerunning skips finished runs; a failed
# run is reported and the sweep goes on (exit 1 at the end); a run stopped by a signal stops the sweep (130 or 143).
# Settings are environment variables; extra arguments go to llm.sweep (and from it to every run).
#   ATTNS="mha gqa mla" MOES="0 1" MAX_ITERS=500 bash scripts/sweep.sh --device cpu
#   python -m llm.report out/sweep/* --out report/     # table and loss curves
set -uo pipefail
cd "$(dirname "$0")/.."
spec="$(mktemp --suffix .json)"
variants=""
for moe in ${MOES:-0 1}; do
  if [ "$moe" = 1 ]; then
    variant="\"moe\": {\"ffn\": \"moe\", \"up_dim\": ${MOE_UP_DIM:-256}}"
  else
    variant="\"dense\": {\"ffn\": \"dense\", \"up_dim\": ${UP_DIM:-768}}"
  fi
  variants="${variants:+$variants, }$variant"
done
attns="$(printf '"%s", ' ${ATTNS:-mha gqa mla})"
printf '{"grid": {"attn": [%s]}, "variants": {%s}}\n' "${attns%, }" "$variants" > "$spec"
python -m llm.sweep --file "$spec" --name "${PREFIX:-sweep}" --out_dir "${OUT_DIR:-out}" \
    --n_head "${N_HEAD:-4}" --n_kv_heads "${N_KV_HEADS:-2}" \
    --kv_latent_dim "${KV_LATENT_DIM:-32}" --q_latent_dim "${Q_LATENT_DIM:-64}" --rope_head_dim "${ROPE_HEAD_DIM:-16}" \
    --n_exp "${N_EXP:-8}" --n_shared "${N_SHARED:-1}" --n_act "${N_ACT:-3}" \
    --non_linearity "${NON_LINEARITY:-swiglu}" --pos_emb "${POS_EMB:-rope}" --norm "${NORM:-rms}" \
    --dataset "${DATASET:-shakespeare_char}" --total_batch_size_str "${TOTAL_BATCH:-2**11}" \
    --batch_size "${BATCH_SIZE:-16}" --max_iters "${MAX_ITERS:-500}" --learning_rate "${LR:-1e-3}" \
    --seeds "${SEED:-1337}" --eval_interval "${EVAL_INTERVAL:-100}" --eval_iters "${EVAL_ITERS:-20}" "$@"
status=$?
rm -f "$spec"
exit "$status"
