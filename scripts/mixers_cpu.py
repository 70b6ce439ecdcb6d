"""Sequence mixers side by side on Tiny Shakespeare (characters), one training run each through train.py, then one
markdown table: parameters, validation loss, training tokens/s, generation cache bytes per token at a 1k context
and greedy decoding tokens/s at a 1k context.

The decoding figures come from a model with the run's layers at block_size 1024 and random weights (the speed of a
decoding step does not depend on the weights), prefilled with 960 tokens and then decoding 64 with the cache (the
prefill is not timed; tokens/s is one over the median step of the fastest of three such runs).

    python scripts/mixers_cpu.py --mixers gqa,window,nsa,ngpt --max_iters 500 [-- flags for every run]
    python scripts/mixers_cpu.py --mixers gqa,mamba,hyena,hybrid

Each mixer's flags are chosen so that the models hold about 1.0M parameters (4 layers of width 128 for the attention
kinds, SwiGLU MLPs narrowed where a mixer has more weights of its own).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llm.config.fields import model_config_from_dict  # noqa: E402
from llm.generate import generate  # noqa: E402
from llm.model import build_model  # noqa: E402

GQA = ["--attn", "gqa", "--n_head", "4", "--n_kv_heads", "2", "--up_dim", "512"]
MAMBA = {"attn": "mamba", "ffn": "none", "expand": 2, "non_linearity": "swiglu", "n_head": 4, "up_dim": 512}
ATTENTION = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "ffn": "dense", "up_dim": 512, "non_linearity": "swiglu"}
MIXERS = {
    "gqa": GQA,
    "window": GQA + ["--window", "32"],
    "nsa": ["--attn", "nsa", "--n_head", "4", "--n_kv_heads", "2", "--up_dim", "416"],
    "ngpt": GQA + ["--arch", "ngpt", "--norm", "layer", "--no_tie_embeddings", "--weight_decay", "0",
                   "--warmup_steps", "0"],
    "hyena": ["--attn", "hyena", "--n_head", "4", "--up_dim", "448"],
    "mamba": ["--attn", "mamba", "--ffn", "none", "--expand", "2", "--n_layer", "8"],
    "hybrid": "hybrid",  # Mamba, Mamba, GQA, twice: attention every third layer (a JSONL layer file)
}
COMMON = ["--dataset", "shakespeare_char", "--device", "cpu", "--n_embd", "128", "--block_size", "128",
          "--pos_emb", "rope", "--norm", "rms", "--non_linearity", "swiglu", "--batch_size", "16",
          "--total_batch_size_str", "16*128", "--learning_rate", "1e-3", "--log_interval", "10", "--eval",
          "--overwrite", "--no_save_model"]
CONTEXT, NEW_TOKENS, DECODE_REPEATS = 1024, 64, 3


def hybrid_layers(out_dir: Path) -> list[str]:
    """Flags that read the hybrid stack from a JSONL file written into out_dir."""
    path = out_dir / "hybrid_layers.jsonl"
    path.write_text("".join(json.dumps(spec) + "\n" for spec in [MAMBA, MAMBA, ATTENTION] * 2))
    return ["--layer_configs_jsonl", str(path)]


def train(name: str, args, extra: list[str]) -> Path:
    """Trains one mixer with train.py and returns its run directory."""
    flags = hybrid_layers(args.out_dir) if MIXERS[name] == "hybrid" else MIXERS[name]
    run = ["--out_dir", str(args.out_dir), "--wandb_run_name", f"mixer_{name}", "--max_iters", str(args.max_iters),
           "--eval_interval", str(args.max_iters), "--eval_iters", str(args.eval_iters)]
    if "--n_layer" not in flags and "--layer_configs_jsonl" not in flags:
        run += ["--n_layer", "4"]
    if "--data_dir" not in extra:
        run += ["--data_dir", args.data_dir]
    command = [sys.executable, str(REPO / "train.py"), *COMMON, *run, *flags, *extra]
    print(f"=== {name}: {' '.join(flags)}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return args.out_dir / f"mixer_{name}"


@torch.no_grad()
def decoding(run: Path) -> tuple[float, float]:
    """(cache bytes per token at CONTEXT, decoded tokens/s after a CONTEXT - NEW_TOKENS prompt) of the run's layers
    at block_size CONTEXT with random weights; the speed is that of the median step of the fastest of DECODE_REPEATS
    runs, so that a moment's load on the machine does not move it."""
    saved = json.loads((run / "config.json").read_text())["model"]
    config = model_config_from_dict({**saved, "block_size": CONTEXT}, str(run / "config.json"))
    torch.manual_seed(0)
    model = build_model(config).eval()
    prompt = torch.randint(0, config.vocab_size, (CONTEXT - NEW_TOKENS,)).tolist()
    generate(model, [prompt[:16]], 4, temperature=0)  # warm-up
    medians = []
    for _ in range(DECODE_REPEATS):
        times = []  # after each new token; the first comes after the prefill, which is not timed
        generate(model, [prompt], NEW_TOKENS, temperature=0,
                 on_step=lambda logits, new: times.append(time.perf_counter()))
        medians.append(statistics.median(later - earlier for earlier, later in zip(times, times[1:])))
    return model.cache_bytes(CONTEXT) / CONTEXT, 1 / min(medians)


def row(name: str, run: Path) -> str:
    """The table row of one trained mixer."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in rows[1:-1] or rows)
    model = build_model(model_config_from_dict(json.loads((run / "config.json").read_text())["model"], "config.json"))
    cache_bytes, decode_speed = decoding(run)
    return (f"| {name} | {model.get_num_params()[0]:,} | {rows[-1]['val_loss']:.4f} | {tokens_per_s:,.0f} | "
            f"{cache_bytes:,.0f} | {decode_speed:,.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="gqa,window,nsa,ngpt,mamba,hyena,hybrid",
                        help=f"comma-separated, from {', '.join(MIXERS)}")
    parser.add_argument("--max_iters", type=int, default=500)
    parser.add_argument("--eval_iters", type=int, default=50)
    parser.add_argument("--out_dir", type=Path, default=REPO / "out")
    parser.add_argument("--data_dir", default=str(REPO / "data"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    names = args.mixers.split(",")
    unknown = [n for n in names if n not in MIXERS]
    if unknown:
        sys.exit(f"error: --mixers {unknown[0]!r} is not one of {', '.join(MIXERS)}")
    if not (Path(args.data_dir) / "shakespeare_char" / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "llm.data.prepare", "shakespeare_char", "--out",
                        str(Path(args.data_dir) / "shakespeare_char")], check=True, cwd=REPO)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = {name: train(name, args, extra) for name in names}
    print(f"\n{args.max_iters} steps of 16 x 128 tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| mixer | parameters | val loss | train tokens/s | cache bytes/token at {CONTEXT} | "
          f"decode tokens/s at {CONTEXT} |\n|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(row(name, run), flush=True)


if __name__ == "__main__":
    main()
