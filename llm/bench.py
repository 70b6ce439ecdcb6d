"""Training-step benchmark on synthetic tokens: tokens/s, MFU and peak memory.

    python -m llm.bench [train.py flags] [--steps N] [--warmup N] [--json PATH] [--compare FLAG]
    python -m llm.bench --suite gpu|cpu [--json PATH] [--markdown PATH]      # the speed table (bench_suite.py)

Each step is one forward and backward pass over batch_size x block_size random tokens plus an AdamW step,
with the model, device, precision, --compile and --act_recomp chosen as in training (no data loading, no
gradient accumulation or clipping).
"""
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import tyro

from .bench_suite import hardware_line, markdown, run_suite
from .cli import parse
from .config import BlockConfig, ConfigError, LLMconfig, Trainconfig, exit_on_user_error
from .config.fields import known_fields
from .model import build_model
from .precision import pick_precision
from .train.metrics import peak_memory_bytes
from .train.mfu import mfu
from .train.optim import build_optimizer

SYNTHETIC_VOCAB = 256  # vocabulary when --vocab_size is unset (no dataset is read)


@dataclass
class BenchOptions:
    """Benchmark training steps on synthetic tokens. Every other flag is train.py's (see python train.py --help)."""

    steps: int = 20
    """Timed steps."""
    warmup: int = 5
    """Untimed steps first (compilation happens here)."""
    json: str | None = None
    """Also write the results to this JSON file."""
    compare: str | None = None
    """A boolean flag (act_recomp, compile, moe, ...) to run off and then on in this process, printing the ratio."""
    suite: Literal["gpu", "cpu"] | None = None
    """Run every row of the speed table (gpu: its shapes, on a CUDA GPU; cpu: tiny shapes, a smoke test)."""
    markdown: str | None = None
    """With --suite: also write the table to this markdown file."""


def split_argv(argv: list[str], names: set[str]) -> tuple[list[str], list[str]]:
    """(the flags in `names` with their values, everything else)."""
    own, rest, i = [], [], 0
    while i < len(argv):
        name = argv[i].partition("=")[0].removeprefix("--").replace("-", "_")
        takes_next = name in names and "=" not in argv[i] and i + 1 < len(argv)
        (own if name in names else rest).extend(argv[i:i + 1 + takes_next])
        i += 1 + takes_next
    return own, rest


def benchmark(model_config: LLMconfig, cfg: Trainconfig, options: BenchOptions) -> dict:
    """Times `options.steps` training steps after `options.warmup` untimed ones."""
    torch.manual_seed(cfg.seed)
    precision = pick_precision(cfg.device, cfg.dtype)
    device = precision.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if model_config.vocab_size is None:
        model_config = LLMconfig(**{**model_config.__dict__, "vocab_size": SYNTHETIC_VOCAB})
    model = build_model(model_config).to(device)
    model.act_recomp = cfg.act_recomp
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg, device)
    shape = (cfg.batch_size, model_config.block_size)

    def step() -> None:
        idx = torch.randint(0, model_config.vocab_size, shape, device=device)
        with precision.autocast():
            out = step_model(idx, idx, **model.placeholder_extras(idx.shape[0]))
        precision.backward(out.loss + out.aux_loss)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        model.after_step(out.layer_stats)

    for _ in range(options.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(options.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / options.steps
    total, active = model.get_num_params()
    tokens_per_s = shape[0] * shape[1] / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "params": total, "active_params": active, "tokens_per_step": shape[0] * shape[1],
            "ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, model.flops_per_token(), device),
            "peak_memory_bytes": peak_memory_bytes(device)}


def format_result(r: dict) -> str:
    mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{r['device']}: {r['params']:,} params ({r['active_params']:,} active) | {r['ms_per_step']:.1f} ms/step | "
            f"{r['tokens_per_s']:,.0f} tok/s | MFU {mfu_text} | peak memory {r['peak_memory_bytes'] / 2**20:,.0f} MiB")


def boolean_flags() -> set[str]:
    """The switches --compare accepts: every boolean field, and moe (the --moe / --no_moe spelling of --ffn)."""
    return {name for cls in (LLMconfig, BlockConfig, Trainconfig) for name, kind in known_fields(cls).items()
            if kind is bool} | {"moe"}


def main(argv: list[str] | None = None) -> dict:
    """Parses the benchmark's own flags and train.py's, runs the benchmark (twice with --compare) and reports it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        tyro.cli(BenchOptions, args=["--help"], use_underscores=True)  # prints this tool's own flags and exits
    own, rest = split_argv(argv, {f.name for f in fields(BenchOptions)})
    with exit_on_user_error():
        options = tyro.cli(BenchOptions, args=own, use_underscores=True)
        if options.steps < 1 or options.warmup < 0:
            raise ConfigError(f"--steps={options.steps} must be >= 1 and --warmup={options.warmup} >= 0")
        if options.suite is not None:
            return suite(options, rest)
        if options.compare is not None and options.compare not in boolean_flags():
            raise ConfigError(f"--compare={options.compare!r} is not a boolean flag; use one of "
                              f"{', '.join(sorted(boolean_flags()))}")
        settings = [rest] if options.compare is None else [rest + [f"--no_{options.compare}"],
                                                           rest + [f"--{options.compare}"]]
        configs = [parse(argv_) for argv_ in settings]
        results = [benchmark(model_config, cfg, options) for model_config, cfg in configs]
    for argv_, result in zip(settings, results):
        label = f"{argv_[-1]}: " if options.compare else ""
        print(label + format_result(result))
    result = results[0]
    if options.compare:
        off, on = results
        result = {"off": off, "on": on, "tokens_per_s_ratio": on["tokens_per_s"] / off["tokens_per_s"],
                  "peak_memory_ratio": on["peak_memory_bytes"] / off["peak_memory_bytes"]}
        note = "" if off["device"] != "cpu" else " (on CPU, peak RSS is the process's high-water mark so far)"
        print(f"--{options.compare} / --no_{options.compare}: tokens/s x{result['tokens_per_s_ratio']:.3f}, "
              f"peak memory x{result['peak_memory_ratio']:.3f}{note}")
    if options.json:
        model_config, cfg = configs[-1]
        with open(options.json, "w") as f:
            json.dump({**result, "config": {"model": asdict(model_config), "train": asdict(cfg)}}, f, indent=2)
    return result


def suite(options: BenchOptions, rest: list[str]) -> dict:
    """Runs the speed table's rows, prints the markdown and writes the JSON and markdown files asked for."""
    if rest:
        raise ConfigError(f"--suite takes no train.py flags (got {' '.join(rest)}); each row sets its own")
    if options.suite == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--suite gpu needs a CUDA GPU; use --suite cpu for the tiny-shape run")
    rows = run_suite(options.suite, options, benchmark)
    table = markdown(rows, hardware_line())
    print(table, end="")
    if options.markdown:
        with open(options.markdown, "w") as f:
            f.write(table)
    result = {"hardware": hardware_line(), "suite": options.suite, "rows": rows}
    if options.json:
        with open(options.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
