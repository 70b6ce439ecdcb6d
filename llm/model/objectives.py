"""Training objectives: where the loss is computed from the final hidden states (`objective` in the config)."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMconfig
from .kinds import ObjectiveKind

IGNORE = -1  # target id that contributes no loss


class CausalLM(nn.Module):
    """Next-token prediction: mean cross-entropy of the logits at t against the token at t + 1 (the targets are
    already shifted by the loader); targets equal to -1 are ignored."""

    def __init__(self, config: LLMconfig):
        super().__init__()

    def forward(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = head(hidden)  # (B, T, V)
        if targets is None:
            return logits, None
        B, T, V = logits.shape
        return logits, F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), ignore_index=IGNORE)


CLM = ObjectiveKind("clm", CausalLM)
