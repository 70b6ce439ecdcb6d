"""AdamW with weight decay on 2-D weights only, and the warmup + cosine learning-rate schedule."""
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import Trainconfig

MIN_LR_FRACTION = 0.1  # min_lr when unset, as a fraction of the peak


def build_optimizer(model: nn.Module, cfg: Trainconfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays matrices and embeddings (not with --no_decay_embeddings) but not biases, norm weights and
    parameters marked `_no_weight_decay` (Mamba's A_log and D) (fused kernel on CUDA and CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    tables = set() if cfg.decay_embeddings else {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = [p for p in params if p.dim() >= 2 and id(p) not in tables and not getattr(p, "_no_weight_decay", False)]
    groups = [
        {"params": decayed, "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if all(p is not d for d in decayed)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=device.type in ("cuda", "cpu"))


def cooldown_start(warmup: int, max_iters: int, cooldown_frac: float) -> int:
    """The step where a trapezoid schedule's final decay begins: the last cooldown_frac of max_iters (not before
    the end of warmup)."""
    return max(warmup, max_iters - round(cooldown_frac * max_iters))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each step: linear warmup to `peak`, then a cosine from `decay_from_lr` at step
    `decay_from` down to `min_lr` at `max_iters` (--lr_schedule cosine), or the peak held until the last
    cooldown_frac of the steps and a straight line down to `min_lr` (--lr_schedule trapezoid).

    A fresh run decays from the peak at the end of warmup. A resume that changes max_iters continues the curve
    from the current step's rate (`extended`), so the rate never jumps; the schedule travels in the checkpoint.
    """

    peak: float
    min_lr: float
    warmup_steps: int
    max_iters: int
    decay_from: int
    decay_from_lr: float
    shape: str = "cosine"  # or trapezoid: decay_from_lr held from warmup to decay_from, then a line to min_lr
    cooldown_frac: float = 0.0  # trapezoid: the fraction of max_iters spent in the final decay

    @classmethod
    def of(cls, cfg: Trainconfig) -> "Schedule":
        """A fresh run's schedule; an unset warmup_steps is a tenth of max_iters."""
        warmup = cfg.max_iters // 10 if cfg.warmup_steps is None else cfg.warmup_steps
        min_lr = MIN_LR_FRACTION * cfg.learning_rate if cfg.min_lr is None else cfg.min_lr
        if cfg.lr_schedule == "trapezoid":
            start = cooldown_start(warmup, cfg.max_iters, cfg.cooldown_frac)
            return cls(cfg.learning_rate, min_lr, warmup, cfg.max_iters, start, cfg.learning_rate, "trapezoid",
                       cfg.cooldown_frac)
        return cls(cfg.learning_rate, min_lr, warmup, cfg.max_iters, warmup, cfg.learning_rate)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if step >= self.max_iters:
            return self.min_lr
        if step < self.decay_from:  # the trapezoid's plateau
            return self.decay_from_lr
        progress = (step - self.decay_from) / max(1, self.max_iters - self.decay_from)
        if self.shape == "trapezoid":
            return self.decay_from_lr + progress * (self.min_lr - self.decay_from_lr)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.decay_from_lr - self.min_lr)

    def extended(self, step: int, max_iters: int) -> "Schedule":
        """The schedule of a run resumed at `step` with a new max_iters: still warming up, only the end moves (a
        trapezoid on its plateau also moves its cooldown); past that, the decay restarts from this step's rate and
        reaches min_lr at the new end."""
        if self.shape == "trapezoid":
            start = cooldown_start(self.warmup_steps, max_iters, self.cooldown_frac)
            if step < min(start, self.decay_from):
                return replace(self, max_iters=max_iters, decay_from=start)
            return replace(self, max_iters=max_iters, decay_from=step, decay_from_lr=self(step))
        if step < self.warmup_steps:
            return replace(self, max_iters=max_iters)
        return replace(self, max_iters=max_iters, decay_from=step, decay_from_lr=self(step))
