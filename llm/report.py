"""Compare runs: a markdown table and PNG loss curves from run directories.

    python -m llm.report out/sweep_* --out report/

Reads each run's config.json and metrics.jsonl; writes report/report.md (also printed) and report/loss.png
(needs matplotlib: pip install 'llm[report]').
"""
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

from .config import ConfigError, eval_int_expr, exit_on_user_error, require_folder
from .config.fields import model_config_from_dict
from .model import build_model
from .plugins import Imports, import_modules
from .validate import validate_saved


@dataclass
class ReportArgs:
    """Summarise run directories as a markdown table and loss curves."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run directories (out/RUN), each with config.json and metrics.jsonl."""
    out: str = "report"
    """Folder for report.md and loss.png."""
    overwrite: bool = False
    """Replace the report.md and loss.png that an earlier report left in --out."""
    imports: Imports = field(default_factory=list)
    """--import MODULE (repeatable): a module to import first, e.g. one that registers kinds of its own with
    llm.model.register_arch; looked up on sys.path and in the working directory."""


@dataclass
class Run:
    """One run's configuration and logged metrics."""

    name: str
    config: dict
    rows: list[dict]


def read_rows(path: Path) -> list[dict]:
    """A metrics.jsonl's rows of one run: a torn last line (a killed run) is skipped, and when the steps go back
    (a file that two runs wrote before run directories were owned) only the rows after the last restart count."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break
            raise ConfigError(f"{path} line {number} is not a metrics row; the file is damaged") from None
        if rows and step <= rows[-1]["step"]:
            rows = []
        rows.append(row)
    return rows


def read_run(folder: str) -> Run:
    path = Path(folder)
    if not (path / "config.json").is_file() or not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"{folder}: not a run directory (needs config.json and metrics.jsonl written by train.py)")
    rows = read_rows(path / "metrics.jsonl")
    if not rows:
        raise ConfigError(f"{folder}: metrics.jsonl is empty; the run logged no step")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    return Run(path.name, config, rows)


def parameters(run: Run) -> tuple[int, int]:
    """(total, active) parameters of the run's model, counted on the meta device (no memory used)."""
    model_config = model_config_from_dict(run.config["model"], f"{run.name}/config.json model")
    validate_saved(model_config, f"{run.name}/config.json")
    with torch.device("meta"):
        return build_model(model_config).get_num_params()


def summary(run: Run) -> dict:
    """The figures of one table row."""
    total, active = parameters(run)
    last = run.rows[-1]
    evaluated = [r for r in run.rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in run.rows[1:]] or [last["tokens_per_s"]]  # the first step includes warm-up
    tokens_per_step = eval_int_expr(run.config["train"]["total_batch_size_str"], "total_batch_size_str")
    return {"run": run.name, "params": total, "active": active, "tokens": (last["step"] + 1) * tokens_per_step,
            "train_loss": evaluated[-1]["train_loss"] if evaluated else None,
            "val_loss": evaluated[-1]["val_loss"] if evaluated else None, "last_loss": last["loss"],
            "tokens_per_s": statistics.median(speeds),
            "peak_memory_mib": max(r.get("peak_memory_bytes", 0) for r in run.rows) / 2**20}


def markdown(rows: list[dict]) -> str:
    def number(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = ["| run | params | active | tokens seen | train loss | val loss | last step loss | tokens/s | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['tokens']:,} | "
                     f"{number(r['train_loss'], '.4f')} | {number(r['val_loss'], '.4f')} | {r['last_loss']:.4f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_memory_mib']:,.0f} MiB |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> bool:
    """Training loss (lines) and validation loss (markers) against tokens seen; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(8, 5))
    for run in runs:
        per_step = eval_int_expr(run.config["train"]["total_batch_size_str"], "total_batch_size_str")
        line, = axis.plot([(r["step"] + 1) * per_step for r in run.rows], [r["loss"] for r in run.rows],
                          label=run.name, linewidth=1)
        evaluated = [r for r in run.rows if "val_loss" in r]
        axis.plot([(r["step"] + 1) * per_step for r in evaluated], [r["val_loss"] for r in evaluated], "o",
                  color=line.get_color(), markersize=4)
    axis.set(xlabel="tokens seen", ylabel="loss (lines: train, dots: validation)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def report(run_dirs: list[str], out: str, overwrite: bool = False) -> str:
    """Writes out/report.md and out/loss.png (an earlier report there is replaced only with `overwrite`); returns
    the markdown."""
    if not run_dirs:
        raise ConfigError("give at least one run directory: python -m llm.report out/RUN ...")
    folder = Path(out)
    require_folder(folder, f"--out={out!r}")
    earlier = [name for name in ("report.md", "loss.png") if (folder / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(f"--out={out!r} already holds {' and '.join(earlier)} of an earlier report; pass "
                          "--overwrite to replace them, or another --out")
    runs = [read_run(d) for d in run_dirs]
    table = markdown([summary(r) for r in runs])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(table)
    if not plot(runs, folder / "loss.png"):
        print("matplotlib is not installed, so no loss.png; pip install 'llm[report]'", file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(ReportArgs, args=argv, use_underscores=True)
    with exit_on_user_error():
        import_modules(args.imports)
        print(report(list(args.runs), args.out, args.overwrite), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
