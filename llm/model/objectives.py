"""Training objectives: where the loss is computed from the final hidden states (`objective` in the config)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMconfig
from .chunked_loss import linear_cross_entropy
from .kinds import ObjectiveKind

IGNORE = -1  # target id that contributes no loss


class CausalLM(nn.Module):
    """Next-token prediction: mean cross-entropy of the logits at t against the token at t + 1 (the targets are
    already shifted by the loader); targets equal to -1 are ignored.

    With targets and no logits asked for, the loss is computed over chunks of `chunk` tokens (None: a size chosen
    from the vocabulary, `chunked_loss.chunk_tokens`), so the logits of the whole batch are never materialised."""

    def __init__(self, config: LLMconfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.chunk: int | None = None

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None,
                return_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if targets is not None and not return_logits:
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                        self.vocab_size, IGNORE, self.chunk)
            return None, loss
        logits = F.linear(hidden, weight)[..., : self.vocab_size]  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1), ignore_index=IGNORE)


CLM = ObjectiveKind("clm", CausalLM)
