"""Bytes against tokens at matched training FLOPs on Tiny Shakespeare: a byte-level GPT, MegaByte and H-Net (one
stage) against the character and GPT-2-BPE GPTs of the same width, each trained for the steps that spend the same
FLOPs (FLOPs per token from the model's own count, times the tokens of a step), then scored in bits per byte on
the validation text; with bytes/s and H-Net's achieved compression. One markdown table at the end.

    python scripts/bytes_cpu.py [--iters 1000] [--models gpt_bytes,megabyte,hnet,gpt_chars,gpt_bpe]
                                [--data_dir data] [--out out/bytes_cpu] [extra train.py flags...]
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llm.cli import parse  # noqa: E402  (the repository's package, run from a checkout)
from llm.model import build_model  # noqa: E402

COMMON = ["--n_embd", "128", "--n_head", "4", "--pos_emb", "rope", "--dropout", "0.0"]
MODELS = {  # name: (dataset, its prepare command's arguments, flags); the byte models see 256 bytes, BPE 80 tokens
    "gpt_bytes": ("shakespeare_byte", ["shakespeare_byte"], ["--n_layer", "4", "--block_size", "256"]),
    "megabyte": ("shakespeare_byte", ["shakespeare_byte"], ["--preset", "megabyte-tiny"]),
    "hnet": ("shakespeare_byte", ["shakespeare_byte"], ["--preset", "hnet-tiny"]),
    "gpt_chars": ("shakespeare_char", ["shakespeare_char"], ["--n_layer", "4", "--block_size", "256"]),
    "gpt_bpe": ("shakespeare", ["shakespeare", "--tokenizer", "gpt2"], ["--n_layer", "4", "--block_size", "80"]),
}


def meta(args, dataset: str) -> dict:
    return json.loads((Path(args.data_dir) / dataset / "meta.json").read_text())


def prepare(args, dataset: str, prepare_args: list[str]) -> None:
    """Prepares the dataset under --data_dir unless it is there."""
    out = Path(args.data_dir) / dataset
    if not (out / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "llm.data.prepare", *prepare_args, "--out", str(out)], cwd=REPO,
                       check=True)


def flags_of(name: str, args, extra: list[str]) -> list[str]:
    dataset, _, flags = MODELS[name]
    return [*flags, *COMMON, "--dataset", dataset, "--data_dir", args.data_dir, "--batch_size", str(args.batch),
            "--vocab_size", str(meta(args, dataset)["vocab_size"]), *extra]


def step_flops(name: str, args, extra: list[str]) -> tuple[float, int, int]:
    """Training FLOPs of one step of the model, its FLOPs per token and its parameters."""
    model, train = parse(flags_of(name, args, extra))
    built = build_model(model)
    per_token = built.flops_per_token()
    return per_token * train.batch_size * model.block_size, per_token, built.get_num_params()[0]


def train(name: str, steps: int, args, extra: list[str]) -> list[dict]:
    """Trains one model for `steps` steps and returns its metrics rows."""
    command = [sys.executable, "train.py", *flags_of(name, args, extra), "--max_iters", str(steps),
               "--eval_interval", str(steps), "--eval_iters", str(args.eval_iters), "--out_dir", args.out,
               "--wandb_run_name", name, "--log_interval", "10", "--no_save_model"]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1000, help="steps of the byte-level GPT; the budget of all")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval_iters", type=int, default=50)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--out", default="out/bytes_cpu")
    args, extra = parser.parse_known_args()
    names = args.models.split(",")
    for name in names:
        prepare(args, MODELS[name][0], MODELS[name][1])
    budget = step_flops("gpt_bytes", args, extra)[0] * args.iters
    print(f"budget: {budget:.6g} training FLOPs, those of {args.iters} steps of gpt_bytes", flush=True)
    rows = []
    for name in names:
        per_step, per_token, parameters = step_flops(name, args, extra)
        steps = max(1, round(budget / per_step))
        metrics = train(name, steps, args, extra)
        last = metrics[-1]
        bytes_per_token = meta(args, MODELS[name][0])["bytes_per_token"]
        speed = statistics.median(r["tokens_per_s"] for r in metrics[1:] or metrics) * bytes_per_token
        chunks = [r["hnet/compression0"] for r in metrics if "hnet/compression0" in r]
        compression = f"{statistics.mean(chunks[-10:]):.2f}" if chunks else "-"
        rows.append(f"| {name} | {parameters:,} | {per_token / 1e6:.2f} | {steps:,} | {steps * per_step / 1e12:.2f} | "
                    f"{last['val_loss']:.4f} | {last['val_bpb']:.3f} | {speed:,.0f} | {compression} |")
        print(rows[-1], flush=True)
    print("\n| model | parameters | MFLOPs/token | steps | training TFLOPs | val loss (nats/token) | bits per byte | "
          "train bytes/s | H-Net bytes per chunk |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
