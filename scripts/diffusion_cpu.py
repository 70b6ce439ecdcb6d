"""MDLM, SEDD and D3PM against the causal GPT of the same shape on Tiny Shakespeare characters, on the same tokens:
the validation bound (NELBO per token, with its Monte-Carlo standard error) against the causal model's loss, bits
per byte, training tokens/s, sampling speed at 128 steps, and a sample of each; one markdown table at the end.

    python scripts/diffusion_cpu.py [--iters 2000] [--out out/diffusion_cpu] [extra train.py flags...]
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = {"clm": ["--pos_emb", "rope"], "mdlm": ["--preset", "mdlm-tiny"], "sedd": ["--preset", "sedd-tiny"],
         "d3pm": ["--preset", "d3pm-tiny"]}  # the tiny model, with rotary positions as the diffusion presets


def train(name: str, flags: list[str], args, extra: list[str]) -> dict:
    """Trains one model and returns its last metrics row with the median tokens/s and parameters."""
    command = [sys.executable, "train.py", *flags, "--max_iters", str(args.iters), "--eval_interval", str(args.iters),
               "--eval_iters", str(args.eval_iters), "--out_dir", args.out, "--wandb_run_name", name, "--log_interval",
               "10", *extra]
    log = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()]
    speed = statistics.median(r["tokens_per_s"] for r in rows[1:])
    parameters = int(re.search(r"model: ([\d,]+) parameters", log).group(1).replace(",", ""))
    return {**rows[-1], "speed": speed, "parameters": parameters}


def sample(name: str, diffusion: bool, args) -> tuple[float, str]:
    """Tokens/s of sampling 256 characters (128 steps per window for a diffusion model) and the sample text."""
    flags = ["--steps", "128"] if diffusion else []
    done = subprocess.run([sys.executable, "sample.py", "--ckpt", str(Path(args.out) / name), "--max_new_tokens",
                           "256", "--prompt", "ROMEO:", *flags], cwd=REPO, capture_output=True, text=True, check=True)
    speed = float(re.search(r"\(([\d,.]+) tokens/s", done.stderr).group(1).replace(",", ""))
    return speed, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--eval_iters", type=int, default=100)
    parser.add_argument("--out", default="out/diffusion_cpu")
    args, extra = parser.parse_known_args()
    rows, samples = [], {}
    for name, flags in KINDS.items():
        figures = train(name, flags, args, extra)
        speed, text = sample(name, name != "clm", args)
        samples[name] = text
        bound = f"{figures['val_loss']:.4f} ± {figures['val_loss_se']:.4f} (bound)" if "val_loss_se" in figures \
            else f"{figures['val_loss']:.4f} (exact)"
        rows.append(f"| {name} | {figures['parameters']:,} | {bound} | {figures['val_bpb']:.3f} | "
                    f"{figures['speed']:,.0f} | {speed:,.0f} |")
        print(rows[-1], flush=True)
    print("\n| objective | parameters | validation NLL per character (nats) | bits per byte | train tokens/s | "
          "sampling tokens/s |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    for name, text in samples.items():
        print(f"\n{name}:\n{text[:300]}")


if __name__ == "__main__":
    main()
