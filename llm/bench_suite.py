"""The speed table in one call: every row benchmarked in one process, written as JSON and a markdown table.

    python -m llm.bench --suite gpu --json suite.json --markdown suite.md    # the H100 table (docs/benchmarks.md)
    python -m llm.bench --suite cpu                                        # the same rows at tiny shapes

A row is one or more variants (train.py flags) whose results give the row's figure: an MFU, a ratio of two
variants, or tokens/s per variant. A variant that cannot run here (a kernel or extra that is missing, a GPU
feature on a CPU) records its one-line reason and the suite goes on.
"""
import contextlib
import gc
import io
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .cli import parse
from .config import LLMconfig, Trainconfig

LLAMA_1B = ["--n_layer", "16", "--n_embd", "2048", "--n_head", "32", "--attn", "gqa", "--n_kv_heads", "8",
            "--up_dim", "8192", "--non_linearity", "swiglu", "--norm", "rms", "--pos_emb", "rope", "--rope_theta",
            "500000", "--vocab_size", "128256", "--no_tie_embeddings", "--block_size", "2048", "--batch_size", "4",
            "--total_batch_size_str", "4*2048", "--compile"]
GPU_MODEL = ["--n_layer", "12", "--n_embd", "1024", "--n_head", "16", "--norm", "rms", "--pos_emb", "rope",
             "--non_linearity", "swiglu", "--vocab_size", "50304", "--block_size", "2048", "--batch_size", "8",
             "--total_batch_size_str", "8*2048", "--compile"]
TINY = ["--device", "cpu", "--dtype", "float32", "--no_compile", "--n_layer", "2", "--n_embd", "64", "--n_head", "4",
        "--n_kv_heads", "2", "--kv_latent_dim", "16", "--rope_head_dim", "8", "--vocab_size", "256", "--block_size",
        "32", "--batch_size", "2", "--total_batch_size_str", "64"]


def mfu_of(label: str) -> Callable[[dict], str]:
    return lambda r: "n/a" if r[label].get("mfu") is None else f"MFU {100 * r[label]['mfu']:.1f}%"


def ratio(on: str, off: str, key: str, name: str) -> Callable[[dict], str]:
    return lambda r: f"{name} x{r[on][key] / r[off][key]:.2f}" if r[on].get(key) and r[off].get(key) else "n/a"


def recompute_summary(r: dict) -> str:
    return f"{ratio('on', 'off', 'peak_memory_bytes', 'peak memory')(r)}, {ratio('on', 'off', 'ms_per_step', 'step time')(r)}"


def each_speed(r: dict) -> str:
    return ", ".join(f"{label} {v['tokens_per_s']:,.0f} tok/s" for label, v in r.items() if "tokens_per_s" in v) or "n/a"


@dataclass(frozen=True)
class Row:
    """One line of the table: its variants (label -> train.py flags) and how their results make its figure."""

    name: str
    target: str
    variants: dict[str, list[str]]
    figure: Callable[[dict], str]


ROWS = [
    Row("GPT-2-124M, seq 1024, bf16, compile", "MFU >= 50%",
        {"gpt2": ["--preset", "gpt2-124m", "--block_size", "1024", "--batch_size", "16", "--total_batch_size_str",
                  "16*1024", "--compile"]}, mfu_of("gpt2")),
    Row("Llama-shaped 1B, seq 2048", "MFU >= 45%", {"llama1b": LLAMA_1B}, mfu_of("llama1b")),
    Row("llama3-8b-genomic shape, 8 layers, seq 8192, act recomp", "MFU >= 52%",
        {"genomic": ["--preset", "llama3-8b-genomic", "--n_layer", "8", "--block_size", "8192", "--batch_size", "1",
                     "--total_batch_size_str", "8192", "--act_recomp", "--compile"]}, mfu_of("genomic")),
    Row("MoE 8 experts top-2 vs dense, same active parameters", "active MFU >= 0.7x dense",
        {"dense": GPU_MODEL + ["--ffn", "dense", "--up_dim", "2816"],
         "moe": GPU_MODEL + ["--moe", "--n_exp", "8", "--n_shared", "0", "--n_act", "2", "--up_dim", "1408"]},
        ratio("moe", "dense", "mfu", "active MFU")),
    Row("MLA vs GQA", "tokens/s >= 0.9x",
        {"gqa": GPU_MODEL + ["--attn", "gqa", "--n_kv_heads", "4"],
         "mla": GPU_MODEL + ["--attn", "mla", "--kv_latent_dim", "256", "--q_latent_dim", "512", "--rope_head_dim",
                             "32"]},
        ratio("mla", "gqa", "tokens_per_s", "tokens/s")),
    Row("--act_recomp", "peak memory -40% at <= 1.35x step time",
        {"off": GPU_MODEL + ["--no_act_recomp"], "on": GPU_MODEL + ["--act_recomp"]}, recompute_summary),
    Row("attention kernels", "tokens/s each",
        {backend: GPU_MODEL + ["--attn_backend", backend] for backend in ("sdpa", "cudnn", "flash", "flex")},
        each_speed),
    Row("Float8 vs bf16 on the 1B row", "speedup", {"bf16": LLAMA_1B, "fp8": LLAMA_1B + ["--fp8"]},
        ratio("fp8", "bf16", "tokens_per_s", "tokens/s")),
]


Benchmark = Callable[[LLMconfig, Trainconfig, object], dict]  # llm.bench.benchmark: (model, run, options) -> result


def run_variant(flags: list[str], options, benchmark: Benchmark) -> dict:
    """The benchmark's result for one variant, or {'error': reason} when it cannot run here."""
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):  # tyro prints a panel before exiting on an unknown flag
            model_config, cfg = parse(flags)
        return benchmark(model_config, cfg, options)
    except SystemExit:
        panel = " ".join(re.sub("[\u2500-\u257f]", " ", refused.getvalue()).split())  # without the box lines
        return {"error": f"train.py refused the flags: {panel[:160]}"}
    except (ValueError, RuntimeError, ImportError) as e:  # ConfigError is a ValueError
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_suite(kind: str, options, benchmark: Benchmark) -> list[dict]:
    """Every row's variants, at the table's shapes (gpu) or tiny ones on the CPU (cpu), each measured by
    `benchmark`."""
    rows = []
    for row in ROWS:
        results = {label: run_variant(flags + (TINY if kind == "cpu" else []), options, benchmark)
                   for label, flags in row.variants.items()}
        rows.append({"row": row.name, "target": row.target, "figure": row.figure(results), "variants": results})
    return rows


def markdown(rows: list[dict], hardware: str) -> str:
    """The table: one line per variant, the row's figure on its first line."""
    lines = [hardware, "", "| row | target | measured | variant | tokens/s | MFU | peak memory |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for i, (label, r) in enumerate(row["variants"].items()):
            head = [row["row"], row["target"], row["figure"]] if i == 0 else ["", "", ""]
            if "error" in r:
                cells = [label, f"not run: {r['error']}", "", ""]
            else:
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                cells = [label, f"{r['tokens_per_s']:,.0f}", mfu, f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"]
            lines.append("| " + " | ".join(head + cells) + " |")
    return "\n".join(lines) + "\n"


def hardware_line() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{device}, torch {torch.__version__}"
