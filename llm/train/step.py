"""One optimizer step and one evaluation, and the guards against a non-finite loss and running out of memory."""
import contextlib
import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..checkpoint import step_checkpoints
from ..config import ConfigError, Trainconfig
from ..data.loader import TokenLoader
from ..model import LLM
from ..precision import Precision
from ..targets import extra_names
from .distributed import Distributed, gradient_sync


class StepResult(NamedTuple):
    """One optimizer step's figures, left on the device (reading them is a host sync)."""

    loss: torch.Tensor  # () the objective's loss summed over micro-steps, averaged over ranks
    aux_loss: torch.Tensor  # () the layers' auxiliary losses, summed and averaged likewise
    layer_stats: list[dict[str, torch.Tensor]]  # per layer, its feed-forward stats summed over the global batch
    grad_norm: torch.Tensor  # () before clipping
    stats: dict[str, torch.Tensor]  # the model's own figures (ModelOutput.stats), averaged over micro-steps and ranks


def train_step(model: LLM, step_model: nn.Module, loader: TokenLoader, accum_steps: int, precision: Precision,
               optimizer: torch.optim.Optimizer, cfg: Trainconfig, job: Distributed) -> StepResult:
    """One optimizer step over accum_steps micro-batches, gradients reduced across ranks on the last one only; then
    every layer's after-step hook with the step's global stats (MoE: the aux-free bias update)."""
    zero = torch.zeros((), device=precision.device)
    loss_sum, aux_sum, stats, model_stats = zero.clone(), zero.clone(), None, {}
    for micro_step in range(accum_steps):
        x, y, *rest = loader.next_batch()  # token weights or diffusion times when the objective's batching gives them
        with gradient_sync(step_model, cfg.dist, micro_step == accum_steps - 1, job):
            with precision.autocast():
                out = step_model(x, y, **dict(zip(extra_names(loader.batching), rest)))
            precision.backward((out.loss + out.aux_loss) / accum_steps)
        loss_sum += out.loss.detach().float()
        aux_sum += out.aux_loss.detach().float()
        stats = out.layer_stats if stats is None else [{k: s[k] + new[k] for k in s} for s, new in
                                                       zip(stats, out.layer_stats)]
        model_stats = {k: model_stats.get(k, 0) + v.detach().float() for k, v in out.stats.items()}
    precision.unscale(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    stats = sum_over_ranks(stats, job)  # every rank runs the layers' hooks on the same global figures
    model.after_step(stats)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
    summed = job.sum_all(list(model_stats.values()))
    model_stats = {name: t / (accum_steps * job.world_size) for name, t in zip(model_stats, summed)}
    return StepResult(job.sum(loss_sum) / job.world_size, job.sum(aux_sum) / job.world_size, stats, grad_norm,
                      model_stats)


@contextlib.contextmanager
def out_of_memory_explained(cfg: Trainconfig, block_size: int):
    """Turns running out of device or host memory into one line that names the micro-batch and the ways out."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "DefaultCPUAllocator" not in str(e):
            raise
        raise ConfigError(f"out of memory with micro-batches of batch_size={cfg.batch_size} x block_size={block_size} "
                          "tokens; lower --batch_size (gradient accumulation keeps total_batch_size_str), pass "
                          "--act_recomp, or shrink the model") from None


def sum_over_ranks(layer_stats: list[dict[str, torch.Tensor]], job: Distributed) -> list[dict[str, torch.Tensor]]:
    """Every layer's stats summed over all ranks, in one all-reduce."""
    names = [(i, name) for i, stats in enumerate(layer_stats) for name in stats]
    summed = job.sum_all([layer_stats[i][name] for i, name in names])
    result = [{} for _ in layer_stats]
    for (i, name), tensor in zip(names, summed):
        result[i][name] = tensor
    return result


@torch.no_grad()
def estimate_loss(model: LLM, loaders: dict[str, TokenLoader], iters: int, precision: Precision,
                  job: Distributed) -> dict[str, float]:
    """The objective's figures over `iters` global batches of each split (each rank evaluates its share), as
    SPLIT_NAME: the mean loss, and what the objective adds (a masked LM: the perplexity exp(loss) and the accuracy
    of the most likely token at the masked positions)."""
    model.eval()
    objective = model.objective
    figures = {}
    for split, loader in loaders.items():
        sums = {}
        for _ in range(iters):
            x, y, *rest = loader.next_batch()
            with precision.autocast():
                out = model(x, y, return_logits=objective.eval_logits, **dict(zip(extra_names(loader.batching), rest)))
            sums = {name: sums.get(name, 0) + value for name, value in objective.eval_sums(out, y).items()}
        summed = job.sum_all([torch.as_tensor(value, device=precision.device).float() for value in sums.values()])
        totals = {name: value.item() for name, value in zip(sums, summed)}
        figures.update({f"{split}_{name}": value
                        for name, value in objective.eval_figures(totals, iters * job.world_size).items()})
    model.train()
    return figures


def loss_of_variants(model: LLM, loaders: dict[str, TokenLoader], variants: dict[str, Callable], iters: int,
                     precision: Precision, job: Distributed) -> dict[str, float]:
    """The figures of estimate_loss under each of the model's evaluation variants ({suffix: context}, from
    LLM.evaluation_variants), each key followed by its suffix; every variant sees the batches the loaders give next,
    and the loaders are left where they were (the main evaluation then reads them too)."""
    start = {name: loader.state_dict() for name, loader in loaders.items()}
    losses = {}
    for suffix, variant in variants.items():
        for name, loader in loaders.items():
            loader.load_state_dict(start[name])
        with variant():
            losses.update({f"{key}{suffix}": value for key, value in estimate_loss(model, loaders, iters, precision,
                                                                                     job).items()})
    for name, loader in loaders.items():
        loader.load_state_dict(start[name])
    return losses


class NonFiniteGuard:
    """Remembers the first step whose loss was not finite, on the device (no host sync per step), and stops the run
    when asked to check, before anything is saved from such a step."""

    def __init__(self, device: torch.device, run_dir: Path):
        self.first_bad = torch.full((), -1, device=device)
        self.run_dir = run_dir

    def record(self, step: int, loss: torch.Tensor) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    def check(self) -> None:
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise SystemExit(f"error: the loss became NaN or infinite at step {bad}; {self.kept()}; lower "
                             "--learning_rate or raise --warmup_steps")

    def check_figures(self, step: int, metrics: dict) -> None:
        """Stops the run, as a non-finite training loss does, when a logged loss (train_loss, val_loss, ...: every
        key ending in _loss) is NaN or infinite."""
        bad = [name for name, value in metrics.items() if name.endswith("_loss") and not math.isfinite(value)]
        if bad:
            raise SystemExit(f"error: {bad[0]}={metrics[bad[0]]} at the evaluation after step {step}; {self.kept()}; "
                             "lower --learning_rate or raise --warmup_steps, or evaluate in float32 (--dtype float32)")

    def kept(self) -> str:
        """Where the last good checkpoint is, or that none was saved."""
        found = step_checkpoints(self.run_dir)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved"
