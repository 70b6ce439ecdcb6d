"""The optimizer (AdamW, or Muon with AdamW), the learning-rate schedule and the per-step settings they take."""
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import Trainconfig
from ..model.ffn.experts import ExpertLinear
from .muon import Muon

MIN_LR_FRACTION = 0.1  # min_lr when unset, as a fraction of the peak


def build_optimizer(model: nn.Module, cfg: Trainconfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer that --optimizer names for the model (an LLM, possibly sharded by FSDP2)."""
    if cfg.optimizer == "muon":
        return Muon(muon_groups(model, cfg))
    return build_adamw(model, cfg, device)


def build_adamw(model: nn.Module, cfg: Trainconfig, device: torch.device) -> torch.optim.AdamW:
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


def muon_groups(model: nn.Module, cfg: Trainconfig) -> list[dict]:
    """Muon's param groups, each with its peak rate (peak_lr) and a role: muon for the blocks' matrices (every 2-D
    parameter inside model.blocks but their nn.Embedding tables and the parameters marked `_no_weight_decay`, such
    as Mamba's A_log, plus the MoE expert stacks, (E, out, in) each; routers included), and AdamW for the output
    head (head), the input tables outside the blocks (embed: the token embedding and learned positions, which are
    added together and so share a rate; both join the head when the token embedding is tied to it) and everything
    else (scalar: norm weights, biases, PEER's expert tables).
    Weight decay: muon_weight_decay on the matrices, weight_decay on the head and the input tables (not on tables
    with --no_decay_embeddings), none on the scalars."""
    head = model.lm_head.weight
    tied = head is model.tok_emb.weight
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    in_blocks = {id(p) for p in model.blocks.parameters()}
    expert_stacks = {id(m.weight) for m in model.modules() if isinstance(m, ExpertLinear)}  # convolutions are not
    roles = {"muon": [], "head": [], "embed": [], "scalar": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p is head or (id(p) in tables and id(p) not in in_blocks):
            roles["head" if p is head or tied else "embed"].append(p)
        elif (p.dim() == 2 or id(p) in expert_stacks) and id(p) in in_blocks and id(p) not in tables and not getattr(
                p, "_no_weight_decay", False):
            roles["muon"].append(p)
        else:
            roles["scalar"].append(p)
    table_decay = cfg.weight_decay if cfg.decay_embeddings else 0.0
    adamw = dict(use_muon=False, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    settings = {
        "muon": dict(use_muon=True, peak_lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                     weight_decay=cfg.muon_weight_decay),
        "head": dict(adamw, peak_lr=cfg.head_lr, weight_decay=table_decay if tied else cfg.weight_decay),
        "embed": dict(adamw, peak_lr=cfg.embed_lr, weight_decay=table_decay),
        "scalar": dict(adamw, peak_lr=cfg.scalar_lr, weight_decay=0.0),
    }
    return [dict(settings[role], params=params, role=role, lr=settings[role]["peak_lr"])
            for role, params in roles.items() if params]


def muon_momentum(cfg: Trainconfig, step: int) -> float:
    """Muon's momentum at `step`: a straight line from muon_momentum_start at step 0 to muon_momentum at step
    muon_momentum_warmup, then constant."""
    done = min(1.0, step / cfg.muon_momentum_warmup) if cfg.muon_momentum_warmup > 0 else 1.0
    return cfg.muon_momentum_start + done * (cfg.muon_momentum - cfg.muon_momentum_start)


def set_step_hyperparameters(optimizer: torch.optim.Optimizer, schedule: "Schedule", cfg: Trainconfig,
                             step: int) -> float:
    """Sets every param group's learning rate for `step`, and Muon's momentum, and returns the schedule's rate (the
    logged lr). A group with a peak rate of its own (peak_lr, --optimizer muon) takes peak_lr * schedule(step) /
    schedule.peak; the others (AdamW's) take schedule(step). Both depend on the step alone, so a resume continues
    them exactly."""
    lr = schedule(step)
    for group in optimizer.param_groups:
        group["lr"] = lr * (group["peak_lr"] / schedule.peak) if "peak_lr" in group else lr
        if group.get("use_muon"):
            group["momentum"] = muon_momentum(cfg, step)
    return lr


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
