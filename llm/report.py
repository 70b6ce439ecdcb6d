"""Compare runs: which configuration is better, by how much, and whether the difference is beyond the seeds' noise.

    python -m llm.report out/ablation/* --out report/

Reads each run's config.json and metrics.jsonl. Runs whose configs differ only in the seed (and where they ran) are
one configuration. Writes report/report.md (also printed): one row per configuration, a column for every field that
differs between them, mean ± standard deviation over seeds, and Welch's t-test of each configuration's final
validation loss against the best one's; report/report.csv (the same figures); and, with matplotlib (pip install
'llm[report]'), report/loss.png (validation loss against tokens and against training FLOPs, seed bands) and
report/training.png (learning rate and gradient norm against tokens).
"""
import csv
import io
import json
import re
import statistics
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import tyro

from .config import BlockConfig, ConfigError, LLMconfig, Trainconfig, eval_int_expr, exit_on_user_error, require_folder
from .config.fields import model_config_from_dict
from .model import build_model
from .plugins import Imports, import_modules
from .stats import mean_std, welch_p_value
from .validate import validate_saved

# Run fields that say where and how a run was kept, not what was trained: never a column, never a configuration.
BOOKKEEPING = {"out_dir", "wandb_run_name", "resume", "overwrite", "allow_data_change", "seed", "wandb_log",
               "wandb_project", "data_dir", "log_interval", "ckpt_interval", "keep_last", "save_model", "memory_check",
               "file_name", "peer_log_interval"}
WITHIN_NOISE = 0.05  # a p-value at or above it marks a difference within the seeds' noise
OUTPUTS = ("report.md", "report.csv", "loss.png", "training.png")
SORT_METRICS = ("val_loss", "best_val_loss", "val_bpb", "last_loss")


@dataclass
class ReportArgs:
    """Compare run directories: a table per configuration (seeds averaged), CSV and plots."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run directories (out/RUN), each with config.json and metrics.jsonl."""
    out: str = "report"
    """Folder for report.md, report.csv, loss.png and training.png."""
    sort: Literal["val_loss", "best_val_loss", "val_bpb", "last_loss"] = "val_loss"
    """The column the configurations are sorted by, lowest first: val_loss (final), best_val_loss, val_bpb or
    last_loss (the last step's training loss)."""
    overwrite: bool = False
    """Replace the files that an earlier report left in --out."""
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


def shown(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def field_defaults(cls) -> dict:
    """Each field of a config dataclass with a default, at that default as config.json holds it."""
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)
                if f.default is not MISSING or f.default_factory is not MISSING}
    return json.loads(json.dumps(defaults))


def settings(config: dict) -> dict[str, str]:
    """The run's trained settings, flat: model and run fields by name, a layer field by name when every layer has
    the same value, else as layers[I].NAME; bookkeeping fields (BOOKKEEPING) left out. A field that the run's
    config.json lacks (it was written before the field existed) takes the field's default, as that run did."""
    model = {**field_defaults(LLMconfig), **config["model"]}
    layers = [{**field_defaults(BlockConfig), **layer} for layer in model.pop("layers", None) or []]
    flat = {name: shown(value) for name, value in model.items()}
    for name in sorted({key for layer in layers for key in layer}):
        values = [shown(layer.get(name)) for layer in layers]
        if len(set(values)) == 1:
            flat[name] = values[0]
        else:
            flat.update({f"layers[{i}].{name}": value for i, value in enumerate(values)})
    train = {**field_defaults(Trainconfig), **config["train"]}
    flat.update({name: shown(value) for name, value in train.items() if name not in BOOKKEEPING})
    return flat


@dataclass
class Configuration:
    """Runs that differ only in their seeds, and the fields that set this configuration apart from the others."""

    runs: list[Run]
    differs: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        text = " ".join(f"{k}={v}" for k, v in self.differs.items())
        return text or self.runs[0].name


def group(runs: list[Run]) -> list[Configuration]:
    """The runs' configurations, each with the fields (and only those) whose values differ between them."""
    configurations: dict[tuple, Configuration] = {}
    flats = {id(run): settings(run.config) for run in runs}
    for run in runs:
        key = tuple(sorted(flats[id(run)].items()))
        configurations.setdefault(key, Configuration([])).runs.append(run)
    found = list(configurations.values())
    names = sorted({name for flat in flats.values() for name in flat})
    differing = [name for name in names if len({flats[id(c.runs[0])].get(name) for c in found}) > 1]
    for c in found:
        c.differs = {name: flats[id(c.runs[0])].get(name, "unset") for name in differing}
    return found


OWN_NAMESPACES = ("val/", "tokens/", "mtp/", "rd/")  # metrics of ours that hold a slash


def is_benchmark(key: str) -> bool:
    """Whether a metrics key is an --eval_tasks score: STEM_acc and STEM_acc_norm (multiple choice), or TASK/METRIC
    (lm-evaluation-harness), unlike our own slashed keys (val/NAME_loss, tokens/NAME, mtp/..., rd/..., NAME/layerI)."""
    if key.endswith(("_acc", "_acc_norm")):
        return True
    return "/" in key and not key.startswith(OWN_NAMESPACES) and not re.search(r"/layer\d+$", key)


def final_figures(run: Run) -> dict[str, float]:
    """One run's figures: final and best validation loss and bits per byte, the last step's loss, tokens, training
    FLOPs, median tokens/s, peak memory and the benchmark scores of its last evaluation."""
    last = run.rows[-1]
    evaluated = [r for r in run.rows if "val_loss" in r]
    tokens_per_step = eval_int_expr(run.config["train"]["total_batch_size_str"], "total_batch_size_str")
    tokens = (last["step"] + 1) * tokens_per_step
    speeds = [r["tokens_per_s"] for r in run.rows[1:]] or [last["tokens_per_s"]]  # the first step includes warm-up
    figures = {"last_loss": last["loss"], "tokens": tokens, "tokens_per_s": statistics.median(speeds),
               "flops": last.get("flops_per_token", 0.0) * tokens,
               "peak_memory_mib": max(r.get("peak_memory_bytes", 0) for r in run.rows) / 2**20}
    if evaluated:
        figures.update(val_loss=evaluated[-1]["val_loss"], best_val_loss=min(r["val_loss"] for r in evaluated))
        if "val_bpb" in evaluated[-1]:
            figures["val_bpb"] = evaluated[-1]["val_bpb"]
        figures.update({k: v for k, v in evaluated[-1].items() if is_benchmark(k)})
    return figures


def summarise(configurations: list[Configuration], sort: str) -> list[dict]:
    """One row per configuration: the differing fields, the seeds, parameters, and each figure's mean and standard
    deviation over the seeds; sorted by `sort` (lowest first), with each row's Welch p-value against the first."""
    rows = []
    for c in configurations:
        figures = [final_figures(run) for run in c.runs]
        total, active = parameters(c.runs[0])
        row = {"configuration": c.name, **c.differs, "seeds": len(c.runs), "params": total, "active": active}
        samples = {}
        for name in figures[0]:
            values = [f[name] for f in figures if name in f]
            if len(values) == len(figures):
                samples[name] = values
                row[name], row[f"{name}_std"] = mean_std(values)
        row["_samples"] = samples
        rows.append(row)
    metric = sort if all(sort in r for r in rows) else "last_loss"
    rows.sort(key=lambda r: r[metric])
    for r in rows:
        r["sorted_by"] = metric
        r["p_vs_best"] = None if r is rows[0] else welch_p_value(r["_samples"][metric], rows[0]["_samples"][metric])
    return rows


def compact(n: float) -> str:
    """A count as 950, 30.2K, 12.3M or 1.23B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.0f}"


def plus_minus(row: dict, name: str, fmt: str = ".4f") -> str:
    if name not in row:
        return "n/a"
    std = row.get(f"{name}_std")
    return format(row[name], fmt) + ("" if std is None else f" ± {format(std, fmt)}")


def versus_best(row: dict, first: bool) -> str:
    """best; p=P (≈ when within the noise); or n/a with fewer than two seeds on either side."""
    if first:
        return "best"
    p = row["p_vs_best"]
    if p is None:
        return "n/a (one seed)"
    return f"p={p:.3f}" + (" ≈" if p >= WITHIN_NOISE else "")


def markdown(rows: list[dict], differing: list[str]) -> str:
    """The table: one row per configuration, sorted by its metric."""
    tasks = sorted({k for r in rows for k in r if is_benchmark(k) and not k.endswith("_std")})
    head = [*(differing or ["run"]), "seeds", "params (active)", "tokens", "training FLOPs", "final val loss",
            "best val loss", "val bits/byte", "last step loss", "tokens/s", *tasks, f"vs best ({rows[0]['sorted_by']})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [*(r[name] for name in differing)] if differing else [r["configuration"]]
        cells += [str(r["seeds"]), f"{compact(r['params'])} ({compact(r['active'])})", f"{r['tokens']:,.0f}",
                  f"{r['flops']:.3g}", plus_minus(r, "val_loss"), plus_minus(r, "best_val_loss"),
                  plus_minus(r, "val_bpb"), plus_minus(r, "last_loss"), f"{r['tokens_per_s']:,.0f}",
                  *(plus_minus(r, task, ".3f") for task in tasks), versus_best(r, i == 0)]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nMean ± standard deviation over seeds. vs best: Welch's t-test of the seeds' {rows[0]['sorted_by']} "
            f"against the first row's (two-sided); ≈ marks p ≥ {WITHIN_NOISE}, a difference within the seeds' noise.\n")
    return "\n".join(lines) + "\n" + note


def csv_text(rows: list[dict]) -> str:
    """The rows' figures, means and standard deviations as CSV (one line per configuration)."""
    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if not k.startswith("_")]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def curves(c: Configuration, key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """(tokens, FLOPs, mean, spread) of a logged figure over the configuration's seeds, at the steps every seed
    logged it; the spread is the seeds' min to max (half-width), 0 for one seed."""
    per_run = [{r["step"]: r[key] for r in run.rows if key in r} for run in c.runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    per_step = eval_int_expr(c.runs[0].config["train"]["total_batch_size_str"], "total_batch_size_str")
    flops_per_token = c.runs[0].rows[-1].get("flops_per_token", 0.0)
    tokens = [(s + 1) * per_step for s in steps]
    values = [[p[s] for p in per_run] for s in steps]
    return (tokens, [t * flops_per_token for t in tokens], [sum(v) / len(v) for v in values],
            [(max(v) - min(v)) / 2 for v in values])


def plot(configurations: list[Configuration], folder: Path) -> bool:
    """loss.png (validation loss, else training loss, against tokens and training FLOPs, with the seeds' band) and
    training.png (learning rate and gradient norm against tokens); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    key = "val_loss" if all(any("val_loss" in r for r in run.rows) for c in configurations for run in c.runs) \
        else "loss"
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in configurations:
        tokens, flops, mean, spread = curves(c, key)
        for axis, x in zip(axes, (tokens, flops)):
            line, = axis.plot(x, mean, marker="o" if key == "val_loss" else None, markersize=3, label=c.name)
            axis.fill_between(x, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                              color=line.get_color(), alpha=0.2)
    label = "validation loss" if key == "val_loss" else "training loss"
    axes[0].set(xlabel="tokens seen", ylabel=f"{label} (band: seeds' range)")
    axes[1].set(xlabel="training FLOPs", ylabel=label)
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "loss.png", dpi=120)
    plt.close(figure)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for c in configurations:
        for axis, name in zip(axes, ("lr", "grad_norm")):
            tokens, _, mean, _ = curves(c, name)
            axis.plot(tokens, mean, linewidth=1, label=c.name)
    axes[0].set(xlabel="tokens seen", ylabel="learning rate")
    axes[1].set(xlabel="tokens seen", ylabel="gradient norm (before clipping)", yscale="log")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "training.png", dpi=120)
    plt.close(figure)
    return True


def report(run_dirs: list[str], out: str, overwrite: bool = False, sort: str = "val_loss") -> str:
    """Writes the report's files to `out` (an earlier report there is replaced only with `overwrite`) and returns
    the markdown table."""
    if not run_dirs:
        raise ConfigError("give at least one run directory: python -m llm.report out/RUN ...")
    if sort not in SORT_METRICS:
        raise ConfigError(f"--sort {sort!r} is not one of {', '.join(SORT_METRICS)}")
    folder = Path(out)
    require_folder(folder, f"--out={out!r}")
    earlier = [name for name in OUTPUTS if (folder / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(f"--out={out!r} already holds {', '.join(earlier)} of an earlier report; pass "
                          "--overwrite to replace them, or another --out")
    configurations = group([read_run(d) for d in run_dirs])
    rows = summarise(configurations, sort)
    differing = list(configurations[0].differs)
    table = markdown(rows, differing)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(table)
    (folder / "report.csv").write_text(csv_text(rows))
    if not plot(configurations, folder):
        print("matplotlib is not installed, so no plots; pip install 'llm[report]'", file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(ReportArgs, args=argv, use_underscores=True)
    with exit_on_user_error():
        import_modules(args.imports)
        print(report(list(args.runs), args.out, args.overwrite, args.sort), end="")
        written = [str(Path(args.out) / name) for name in OUTPUTS if (Path(args.out) / name).exists()]
        print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    main(sys.argv[1:])
