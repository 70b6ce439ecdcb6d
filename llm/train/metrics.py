"""What a run reports: the console line, the layers' own figures, memory, and the metrics sinks."""
import json
import resource
from pathlib import Path

import torch

from ..files import write_atomically
from ..model import LLM
from ..model.registry import FFNS


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU: its own (VmHWM of
    /proc/self/status on Linux; getrusage's ru_maxrss also keeps the peak of the process that launched it, when that
    was larger)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepClock:
    """Seconds per step for the ETA, smoothed over the logged intervals: an exponential average (weight SMOOTHING on
    the newest) that drops the first interval, which holds compilation and warm-up, once a second one exists."""

    SMOOTHING = 0.3

    def __init__(self):
        self.intervals, self.seconds_per_step = 0, 0.0

    def update(self, seconds_per_step: float) -> float:
        """Adds one logged interval's seconds per step; returns the smoothed figure."""
        self.intervals += 1
        if self.intervals <= 2:
            self.seconds_per_step = seconds_per_step
        else:
            self.seconds_per_step += self.SMOOTHING * (seconds_per_step - self.seconds_per_step)
        return self.seconds_per_step


def duration(seconds: float) -> str:
    """A duration as 1h02m, 3m05s or 42s."""
    seconds = round(seconds)
    hours, minutes = seconds // 3600, seconds // 60 % 60
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"


def format_metrics(m: dict, max_iters: int) -> str:
    """One console line per logged step: `step N/M` counts from 0 up to max_iters - 1."""
    mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    line = (f"step {m['step']:>{len(str(max_iters))}}/{max_iters} | eta {duration(m['eta_s'])} | "
            f"loss {m['loss']:.4f} | lr {m['lr']:.2e} | norm {m['grad_norm']:.2f} | "
            f"{m['ms_per_step']:.0f} ms | {m['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
            f"mem {m['peak_memory_bytes'] / 2**20:,.0f} MiB")
    if "aux_loss" in m:
        line += f" | aux {m['aux_loss']:.4f}"
    labels = {name: label for kind in FFNS.values() for name, label in kind.summaries.items()}
    line += "".join(f" | {labels[name]} {value:.2f}" for name, value in m.items() if name in labels)
    if "val_loss" in m:
        line += f" | train {m['train_loss']:.4f} | val {m['val_loss']:.4f}"
    return line


def layer_metrics(model: LLM, aux_loss: float, layer_stats: list[dict[str, torch.Tensor]]) -> dict:
    """The step's auxiliary loss (when some layer has one) and each feed-forward layer's figures, as NAME/layerI;
    the figures a kind lists in `summaries` are also reported model-wide as their maximum over the layers."""
    metrics, summaries = {}, {}
    for i, (block, config, stats) in enumerate(zip(model.blocks, model.config.layers, layer_stats)):
        for name, value in block.metrics(stats).items():
            metrics[f"{name}/layer{i}"] = value
            if name in FFNS[config.ffn].summaries:
                summaries[name] = max(summaries.get(name, value), value)
    return {"aux_loss": aux_loss, **metrics, **summaries} if metrics or aux_loss else {}


def row_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a line that is not a complete row."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Prints each metrics line and appends it to metrics.jsonl and, when enabled, to wandb.

    A run resumed at step `resumed_at` first drops the rows of that step and later ones (written by the interrupted
    run after its checkpoint, or a torn last line), so the file keeps one row per step.
    """

    def __init__(self, run_dir: Path, max_iters: int, wandb_run=None, resumed_at: int | None = None):
        path = run_dir / "metrics.jsonl"
        if resumed_at is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if row_step(line) < resumed_at]
            write_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        self.file = open(path, "a")
        self.wandb_run, self.max_iters = wandb_run, max_iters

    def log(self, metrics: dict) -> None:
        print(format_metrics(metrics, self.max_iters), flush=True)
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=metrics["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
