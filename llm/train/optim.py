"""AdamW with weight decay on 2-D weights only, and the warmup + cosine learning-rate schedule."""
import math

import torch
from torch import nn

WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
MIN_LR_FRACTION = 0.1


def build_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays matrices and embeddings but not biases and norm weights (fused on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=device.type == "cuda")


def learning_rate(step: int, max_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr, then cosine decay to MIN_LR_FRACTION * max_lr at max_steps."""
    min_lr = MIN_LR_FRACTION * max_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
