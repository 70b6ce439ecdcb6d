#!/usr/bin/env bash
# One run of a heterogeneous stack read from a JSONL file of layer specs (one JSON object per layer).
#   LAYERS=layer_configs.jsonl RUN_NAME=mla_moe_below bash scripts/train_custom_layers.sh --max_iters 200
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py \
  --layer_configs_jsonl "${LAYERS:-layer_configs.jsonl}" \
  --dataset "${DATASET:-shakespeare_char}" \
  --pos_emb "${POS_EMB:-rope}" --norm "${NORM:-rms}" \
  --n_embd "${N_EMBD:-128}" --block_size "${BLOCK_SIZE:-128}" \
  --total_batch_size_str "${TOTAL_BATCH:-2**11}" --batch_size "${BATCH_SIZE:-16}" \
  --max_iters "${MAX_ITERS:-500}" --learning_rate "${LR:-1e-3}" --seed "${SEED:-1337}" \
  --eval --eval_interval "${EVAL_INTERVAL:-100}" --eval_iters "${EVAL_ITERS:-20}" \
  --wandb_run_name "${RUN_NAME:-custom_layers}" \
  "$@"
