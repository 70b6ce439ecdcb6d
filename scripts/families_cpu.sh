#!/usr/bin/env bash
# The speedrun families on nanoGPT's CPU recipe (scripts/nanogpt_cpu_recipe.sh: 4 layers of width 128, 12 x 64
# tokens per step, 2000 iterations), one run each, then one table: validation loss (200 batches), median
# ms/iteration, tokens/s and parameters. Each family changes only its own flags:
#   adamw       the recipe as it is (AdamW, dense)
#   muon        --optimizer muon (Muon on the hidden matrices, AdamW for the rest)
#   mtp         --mtp sequential --n_mtp_tokens 2 (DeepSeek-V3 modules; the loss compared is the main head's)
#   mtm         --mtp parallel --n_mtp_tokens 2 (independent heads on the trunk)
#   mod         mixture-of-depths on every other layer, capacity 0.125
#   recurrent   recurrent depth at about the recipe's compute: 1 prelude layer, 1 core layer iterated r times
#               (r - 1 a Poisson draw of log-normal rate with mean 2, at most 4, backpropagating through the last
#               2; evaluated at 3) and 1 coda layer
#   record      the speedrun's record GPT (docs/record-gpt.md): RoPE, RMSNorm, ReLU², QK norm, untied head, two
#               value-embedding tables, x0 mixing, U-net skips, logits capped at 15, long/short windows of 16-token
#               blocks grown by the scaled schedule, Muon with the speedrun's Adam settings and trapezoid schedule
#               (the `record` variant of sweeps/record_gpt_cpu.yaml)
#   FAMILIES="adamw muon" ITERS=2000 OUT_DIR=out bash scripts/families_cpu.sh [flags for every run, e.g. --compile]
# DATA_DIR as in scripts/nanogpt_cpu_recipe.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-out}"
family_flags() {  # one argument per line
  local layer='"attn": "mha", "n_head": 4, "ffn": "dense", "up_dim": 512, "non_linearity": "relu2", "qk_norm": true'
  case "$1" in
    adamw) ;;
    muon) printf '%s\n' --optimizer muon ;;
    mtp) printf '%s\n' --mtp sequential --n_mtp_tokens 2 ;;
    mtm) printf '%s\n' --mtp parallel --n_mtp_tokens 2 ;;
    mod) printf '%s\n' --mod --capacity 0.125 --mod_every_other ;;
    recurrent) printf '%s\n' --n_layer 3 --arch recurrent --n_prelude 1 --n_core 1 --n_coda 1 --mean_recurrence 2 \
      --r_max 4 --k_trunc 2 --eval_recurrence 3 --recurrence_sweep 1 2 4 ;;
    record) printf '%s\n' --pos_emb rope --norm rms --non_linearity relu2 --qk_norm --no_tie_embeddings \
      --value_embeds 2 --x0_mix --unet_skips --logit_softcap 15 --window_unit 16 --window_schedule scaled \
      --window_max 64 --window_block 16 --layer_configs \
      "[{$layer, \"window\": 64}, {$layer, \"window\": 32}, {$layer, \"window\": 32}, {$layer, \"window\": 64}]" \
      --optimizer muon --lr_schedule trapezoid --cooldown_frac 0.4 --warmup_steps 0 --beta1 0.8 --beta2 0.95 \
      --adam_eps 1e-10 --weight_decay 0 ;;
    *) echo "error: unknown family $1; choose among adamw muon mtp mtm mod recurrent record" >&2; return 2 ;;
  esac
}
mkdir -p "$OUT_DIR"
names=()
for family in ${FAMILIES:-adamw muon mtp mtm mod recurrent record}; do
  flags_text="$(family_flags "$family")"
  mapfile -t flags <<< "$flags_text"
  [ -n "$flags_text" ] || flags=()
  echo "=== $family: ${flags[*]:-the recipe as it is}"
  OUT_DIR="$OUT_DIR" RUN_NAME="family_$family" bash scripts/nanogpt_cpu_recipe.sh \
    --max_iters "${ITERS:-2000}" "${flags[@]}" "$@" | tee "$OUT_DIR/family_$family.log"
  names+=("$family")
done
python - "$OUT_DIR" "${names[@]}" <<'PY'
import json, platform, statistics, sys
from pathlib import Path

import torch

out_dir, families = Path(sys.argv[1]), sys.argv[2:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
print("| family | val loss (200 batches) | ms/iteration (median) | tokens/s | parameters |\n|---|---|---|---|---|")
for family in families:
    run = out_dir / f"family_{family}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ms = statistics.median(r["ms_per_step"] for r in rows[min(5, len(rows) - 1):-1] or rows)
    summary = (out_dir / f"family_{family}.log").read_text()
    params = summary.split("model: ", 1)[1].split(" parameters", 1)[0]
    print(f"| {family} | {rows[-1]['val_loss']:.4f} | {ms:.1f} | {12 * 64 * 1000 / ms:,.0f} | {params} |")
PY
