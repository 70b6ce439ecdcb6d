#!/usr/bin/env bash
# One training run. Every setting is an environment variable with a default; extra arguments are passed on.
#   ATTN=mla KV_LATENT_DIM=32 ROPE_HEAD_DIM=16 POS_EMB=rope bash scripts/train_single.sh --max_iters 200
set -euo pipefail
cd "$(dirname "$0")/.."
MOE_FLAG=$([ "${MOE:-0}" = 1 ] && echo --moe || echo --no_moe)
AUX_FREE_FLAG=$([ "${AUX_FREE:-0}" = 1 ] && echo --aux_free || echo --no_aux_free)
NORM_TOPK_FLAG=$([ "${NORM_TOPK:-1}" = 1 ] && echo --norm_topk || echo --no_norm_topk)
EVAL_FLAG=$([ "${EVAL:-1}" = 1 ] && echo --eval || echo --no_eval)
python train.py \
  --dataset "${DATASET:-shakespeare_char}" \
  --data_order "${DATA_ORDER:-random}" \
  --total_batch_size_str "${TOTAL_BATCH:-2**11}" \
  --batch_size "${BATCH_SIZE:-16}" \
  --max_iters "${MAX_ITERS:-500}" \
  --learning_rate "${LR:-1e-3}" \
  ${WARMUP:+--warmup_steps "$WARMUP"} \
  --eval_interval "${EVAL_INTERVAL:-100}" \
  --eval_iters "${EVAL_ITERS:-20}" \
  $EVAL_FLAG \
  --n_layer "${N_LAYER:-4}" \
  --n_embd "${N_EMBD:-128}" \
  --block_size "${BLOCK_SIZE:-128}" \
  --pos_emb "${POS_EMB:-rope}" \
  --norm "${NORM:-rms}" \
  --attn "${ATTN:-gqa}" \
  --n_head "${N_HEAD:-4}" \
  --n_kv_heads "${N_KV_HEADS:-2}" \
  --q_latent_dim "${Q_LATENT_DIM:-64}" \
  --kv_latent_dim "${KV_LATENT_DIM:-32}" \
  --rope_head_dim "${ROPE_HEAD_DIM:-16}" \
  --up_dim "${UP_DIM:-512}" \
  --non_linearity "${NON_LINEARITY:-swiglu}" \
  $MOE_FLAG \
  --n_exp "${N_EXP:-8}" --n_shared "${N_SHARED:-1}" --n_act "${N_ACT:-3}" \
  --router_score "${ROUTER_SCORE:-softmax}" $NORM_TOPK_FLAG $AUX_FREE_FLAG \
  --coeff "${COEFF:-0.01}" --alpha "${ALPHA:-1e-4}" --gamma "${GAMMA:-1e-3}" \
  --wandb_run_name "${RUN_NAME:-${ATTN:-gqa}_single}" \
  "$@"
