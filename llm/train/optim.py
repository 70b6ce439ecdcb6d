"""AdamW with weight decay on 2-D weights only, and the warmup + cosine learning-rate schedule."""
import math

import torch
from torch import nn

from ..config import Trainconfig

MIN_LR_FRACTION = 0.1  # min_lr when unset, as a fraction of the peak


def build_optimizer(model: nn.Module, cfg: Trainconfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays matrices and embeddings but not biases and norm weights (fused kernel on CUDA and CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu"))


def learning_rate(step: int, cfg: Trainconfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_iters."""
    max_lr = cfg.learning_rate
    min_lr = MIN_LR_FRACTION * max_lr if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_iters:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_iters - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
