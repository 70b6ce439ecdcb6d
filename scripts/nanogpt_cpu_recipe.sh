#!/usr/bin/env bash
# nanoGPT's CPU recipe on character-level Tiny Shakespeare, as an acceptance run: prints the final validation loss
# (200 batches) and the median milliseconds per iteration. Extra arguments are passed on (e.g. --compile).
# DATA_DIR (default data) holds the prepared dataset, OUT_DIR (default out) the run.
# A rerun moves the previous run aside (OUT_DIR/RUN_NAME.replaced-N), so the figures are always this run's.
#   SOURCE=../shared/data/tinyshakespeare/input.txt bash scripts/nanogpt_cpu_recipe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME="${RUN_NAME:-nanogpt_cpu_recipe}"
OUT_DIR="${OUT_DIR:-out}"
DATA_DIR="${DATA_DIR:-data}"
[ -f "$DATA_DIR/shakespeare_char/meta.json" ] ||
  python -m llm.data.prepare shakespeare_char --out "$DATA_DIR/shakespeare_char" ${SOURCE:+--source "$SOURCE"}
python train.py --dataset shakespeare_char --data_dir "$DATA_DIR" --device cpu \
  --n_layer 4 --n_head 4 --n_embd 128 --attn mha --pos_emb learn --norm layer --non_linearity gelu --up_dim 512 \
  --tie_embeddings --no_bias --dropout 0 --block_size 64 --batch_size 12 --total_batch_size_str '12*64' \
  --max_iters 2000 --learning_rate 1e-3 --warmup_steps 100 --min_lr 1e-4 --beta1 0.9 --beta2 0.99 \
  --weight_decay 0.1 --grad_clip 1.0 --eval --eval_interval 2000 --eval_iters 200 --log_interval 1 \
  --out_dir "$OUT_DIR" --wandb_run_name "$RUN_NAME" --overwrite "$@" | grep -E '^(model|step +[0-9]*00/|step 1999/|moved)'
python - "$OUT_DIR/$RUN_NAME/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = rows[-1]
print(f"final val loss {last['val_loss']:.4f} (200 batches), train {last['train_loss']:.4f}; "
      f"median {statistics.median(r['ms_per_step'] for r in rows[1:]):.1f} ms/iteration over {len(rows) - 1} steps")
PY
