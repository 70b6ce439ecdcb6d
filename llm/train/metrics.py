"""What a run reports: the console line, balance figures of MoE layers, memory, and the metrics sinks."""
import json
import resource
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_metrics(m: dict) -> str:
    """One console line per logged step."""
    mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    line = (f"step {m['step']:>5} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | norm {m['grad_norm']:.2f} | "
            f"{m['ms_per_step']:.0f} ms | {m['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
            f"mem {m['peak_memory_bytes'] / 2**20:,.0f} MiB")
    if "balance_loss" in m:
        line += f" | balance {m['balance_loss']:.4f} | max/mean load {m['max_load_ratio']:.2f}"
    if "val_loss" in m:
        line += f" | train {m['train_loss']:.4f} | val {m['val_loss']:.4f}"
    return line


def moe_metrics(balance_loss: float, loads: list[torch.Tensor], layers: list[int]) -> dict:
    """Balance figures of one step: the balance loss, and per MoE layer its load fractions and max/mean load
    ratio (1 is perfect balance); max_load_ratio is the worst layer's."""
    metrics = {"balance_loss": balance_loss}
    for layer, load in zip(layers, loads):
        load = load.float().cpu()
        metrics[f"load_fractions/layer{layer}"] = [round(v, 4) for v in (load / load.sum()).tolist()]
        metrics[f"max_load_ratio/layer{layer}"] = (load.max() / load.mean()).item()
    metrics["max_load_ratio"] = max(v for k, v in metrics.items() if k.startswith("max_load_ratio/"))
    return metrics


class MetricsLog:
    """Prints each metrics line and appends it to metrics.jsonl and, when enabled, to wandb."""

    def __init__(self, run_dir: Path, wandb_run=None):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.wandb_run = wandb_run

    def log(self, metrics: dict) -> None:
        print(format_metrics(metrics), flush=True)
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=metrics["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
