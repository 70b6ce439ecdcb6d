"""Training objectives: where the loss is computed from the final hidden states (`objective` in the config)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMconfig
from .chunked_loss import linear_cross_entropy
from .kinds import ObjectiveKind

IGNORE = -1  # target id that contributes no loss


def codon_loss(config: LLMconfig) -> nn.Module | None:
    """The codon-tree loss that replaces cross-entropy (loss hxe or soft_labels), or None for cross-entropy."""
    if config.loss == "ce":
        return None
    from .codon_losses import CodonTree, HXELoss, SoftLabelLoss, codon_token_names

    tree = CodonTree(codon_token_names())
    return HXELoss(tree, config.hxe_alpha) if config.loss == "hxe" else SoftLabelLoss(tree, config.soft_label_beta)


class TokenLoss(nn.Module):
    """The loss of the logits at each position against the target at that position, averaged over the targets that
    are not -1: cross-entropy, or a codon-tree loss (`loss`). The loader places the targets: the next tokens for
    clm (targets already shifted), the masked tokens for mlm (-1 elsewhere).

    Cross-entropy with targets and no logits asked for is computed over chunks of `chunk` tokens (None: a size
    chosen from the vocabulary, `chunked_loss.chunk_tokens`), so the logits of the whole batch are never
    materialised."""

    def __init__(self, config: LLMconfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.chunk: int | None = None
        self.codon_loss = codon_loss(config)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None,
                return_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if targets is not None and not return_logits and self.codon_loss is None:
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                        self.vocab_size, IGNORE, self.chunk)
            return None, loss
        logits = F.linear(hidden, weight)[..., : self.vocab_size]  # (B, T, V)
        if targets is None:
            return logits, None
        flat_logits, flat_targets = logits.reshape(-1, self.vocab_size), targets.reshape(-1)  # (B*T, V), (B*T,)
        if self.codon_loss is not None:
            return logits, self.codon_loss(flat_logits, flat_targets)
        return logits, F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE)


CLM = ObjectiveKind("clm", TokenLoss)
MLM = ObjectiveKind("mlm", TokenLoss, causal=False)
