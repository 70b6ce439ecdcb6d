"""The loss both token objectives share: cross-entropy of the logits at each position against its target (or a
codon-tree loss), computed in chunks without materialising the logits, and the figures of an evaluation."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, LLMconfig, Trainconfig
from ...targets import IGNORE
from ..chunked_loss import linear_cross_entropy, soft_cap
from ..codon_losses import CodonTree, HXELoss, SoftLabelLoss, codon_token_names

MAX_LOG_PPL = 709.0  # exp of more overflows a float: the perplexity is then reported as inf


def codon_loss(config: LLMconfig) -> nn.Module | None:
    """The codon-tree loss that replaces cross-entropy (loss hxe or soft_labels), or None for cross-entropy."""
    if config.loss == "ce":
        return None
    tree = CodonTree(codon_token_names())
    return HXELoss(tree, config.hxe_alpha) if config.loss == "hxe" else SoftLabelLoss(tree, config.soft_label_beta)


class TokenLoss(nn.Module):
    """The loss of the logits at each position against the target at that position, averaged over the targets that
    are not -1: cross-entropy, or a codon-tree loss (`loss`). The objective's batching places the targets: the next
    tokens for clm, the masked tokens for mlm (-1 elsewhere). Per-token weights (B, T), when the batching gives
    them, multiply each token's cross-entropy term (the mean stays over the counted tokens).

    Cross-entropy with targets and no logits asked for is computed over chunks of `chunk` tokens (None: a size
    chosen from the vocabulary, `chunked_loss.chunk_tokens`), so the logits of the whole batch are never
    materialised. With --logit_softcap c the logits are c * tanh(z / c), in both paths.

    The inputs and a diffusion time that the model passes to every objective's loss are not read here.

    Evaluation: `eval_logits` says whether an evaluation batch needs the logits, `eval_sums(out, y)` the tensors
    summed over batches and ranks, and `eval_figures(sums, batches)` the logged figures (without the split's prefix).
    """

    eval_logits = False

    def __init__(self, config: LLMconfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.chunk: int | None = None
        self.codon_loss = codon_loss(config)
        self.codon_loss_name = config.loss
        self.softcap = config.logit_softcap
        self.fp8 = False  # the chunked loss's matmuls in float8 (--fp8_head, set by configure_run)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None,
                return_logits: bool, token_weights: torch.Tensor | None = None, inputs: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if token_weights is not None and self.codon_loss is not None:
            raise ConfigError(f"loss={self.codon_loss_name} takes no per-token weights, which this objective gives; "
                              "use --loss ce")
        flat_weights = None if token_weights is None else token_weights.reshape(-1)  # (B*T,)
        if targets is not None and not return_logits and self.codon_loss is None:
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                        self.vocab_size, IGNORE, self.chunk, flat_weights, self.softcap, self.fp8)
            return None, loss
        logits = soft_cap(F.linear(hidden, weight)[..., : self.vocab_size], self.softcap)  # (B, T, V)
        if targets is None:
            return logits, None
        flat_logits, flat_targets = logits.reshape(-1, self.vocab_size), targets.reshape(-1)  # (B*T, V), (B*T,)
        if self.codon_loss is not None:
            return logits, self.codon_loss(flat_logits, flat_targets)
        if flat_weights is None:
            return logits, F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE)
        per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="none")  # (B*T,)
        return logits, (per_token * flat_weights).sum() / (flat_targets != IGNORE).sum()

    def configure_run(self, train: Trainconfig) -> None:
        """The run's settings: --fp8_head puts the chunked loss's matmuls in float8."""
        self.fp8 = train.fp8_head

    def eval_sums(self, out, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One evaluation batch's figures to sum: its mean loss ()."""
        return {"loss": out.loss.float()}

    def eval_figures(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        """The mean loss over `batches` batches."""
        return {"loss": sums["loss"] / batches}


class MaskedTokenLoss(TokenLoss):
    """TokenLoss whose evaluation also reports the perplexity exp(loss) and the accuracy of the most likely token at
    the masked positions."""

    eval_logits = True

    def eval_sums(self, out, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mean loss (), the masked positions predicted right () and the masked positions ()."""
        scored = y != IGNORE  # (B, T)
        return {"loss": out.loss.float(), "hits": ((out.logits.argmax(-1) == y) & scored).sum(), "masked": scored.sum()}

    def eval_figures(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        loss = sums["loss"] / batches
        ppl = math.inf if loss > MAX_LOG_PPL else math.exp(loss)  # NaN stays NaN
        return {"loss": loss, "ppl": ppl, "masked_acc": sums["hits"] / max(1.0, sums["masked"])}
