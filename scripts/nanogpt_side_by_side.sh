#!/usr/bin/env bash
# nanoGPT's documented CPU recipe and ours, one after the other on this machine, with one table at the end:
# median ms/iteration, tokens/s and the validation loss over 200 batches after 2000 iterations.
#   NANOGPT_DIR=path/to/a/nanoGPT/checkout bash scripts/nanogpt_side_by_side.sh [our extra flags, e.g. --compile]
# nanoGPT's files are copied to a scratch folder and run there (its checkout is not written to); its data is
# prepared from the Tiny Shakespeare text that ships with llm, so nothing is downloaded. REPEATS=2 runs the pair
# twice (nanoGPT, ours, ours, nanoGPT) to see how much the machine's noise moves the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NANOGPT_DIR:?set NANOGPT_DIR to a checkout of https://github.com/karpathy/nanoGPT}"
[ -f "$NANOGPT_DIR/train.py" ] || { echo "error: NANOGPT_DIR=$NANOGPT_DIR has no train.py" >&2; exit 2; }
ITERS="${ITERS:-2000}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/nanogpt/data/shakespeare_char"
cp -r "$NANOGPT_DIR"/{train.py,model.py,configurator.py,config} "$SCRATCH/nanogpt/"
cp "$NANOGPT_DIR/data/shakespeare_char/prepare.py" "$SCRATCH/nanogpt/data/shakespeare_char/"
cp llm/data/tinyshakespeare.txt "$SCRATCH/nanogpt/data/shakespeare_char/input.txt"
(cd "$SCRATCH/nanogpt" && python data/shakespeare_char/prepare.py > /dev/null)

run_nanogpt() {  # prints "ms_per_iteration val_loss" (the first iterations, and the one after evaluation, aside)
  (cd "$SCRATCH/nanogpt" && python train.py config/train_shakespeare_char.py --device=cpu --compile=False \
    --dtype=float32 --eval_iters=200 --eval_interval="$ITERS" --log_interval=1 --block_size=64 --batch_size=12 \
    --n_layer=4 --n_head=4 --n_embd=128 --max_iters="$ITERS" --lr_decay_iters="$ITERS" --dropout=0.0 \
    --always_save_checkpoint=False --out_dir="$SCRATCH/nanogpt_out") > "$SCRATCH/nanogpt.log"
  python - "$SCRATCH/nanogpt.log" "$ITERS" <<'PY'
import re, statistics, sys
text, last = open(sys.argv[1]).read(), int(sys.argv[2])
times = [float(t) for i, t in re.findall(r"iter (\d+): loss \S+, time ([\d.]+)ms", text) if 5 <= int(i) < last]
val = re.findall(r"step \d+: train loss \S+, val loss ([\d.]+)", text)[-1]
print(f"{statistics.median(times):.2f} {val}")
PY
}

run_ours() {  # the same figures from scripts/nanogpt_cpu_recipe.sh
  OUT_DIR="$SCRATCH/out" RUN_NAME=recipe bash scripts/nanogpt_cpu_recipe.sh --max_iters "$ITERS" "$@" \
    > "$SCRATCH/ours.log"
  python - "$SCRATCH/out/recipe/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{statistics.median(r['ms_per_step'] for r in rows[5:-1]):.2f} {rows[-1]['val_loss']:.4f}")
PY
}

results=()
for _ in $(seq "${REPEATS:-1}"); do
  results+=("nanoGPT $(run_nanogpt)" "llm $(run_ours "$@")")
  [ "${REPEATS:-1}" = 1 ] || results+=("llm $(run_ours "$@")" "nanoGPT $(run_nanogpt)")
done
python - "$ITERS" "${results[@]}" <<'PY'
import platform, statistics, sys, torch
iters, rows = sys.argv[1], [line.split() for line in sys.argv[2:]]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {iters} iterations of 12 x 64 tokens")
print("| trainer | ms/iteration (median) | tokens/s | val loss (200 batches) |\n|---|---|---|---|")
for name, ms, val in rows:
    print(f"| {name} | {float(ms):.1f} | {12 * 64 * 1000 / float(ms):,.0f} | {float(val):.4f} |")
median = {name: statistics.median(float(ms) for n, ms, _ in rows if n == name) for name in ("nanoGPT", "llm")}
print(f"llm is {median['nanoGPT'] / median['llm']:.2f}x nanoGPT's tokens/s (medians over runs)")
PY
