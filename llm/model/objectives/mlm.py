"""`objective: mlm`, masked language modelling (BERT, HELM): every mixer sees the whole sequence; a fraction of the
tokens is masked and the loss is taken at those positions."""
import torch

from ...config import ConfigError, LLMconfig, Trainconfig
from ...targets import IGNORE, LabelRules
from ..kinds import ObjectiveKind
from .token_loss import MaskedTokenLoss


class Masking:
    """Batching of rows of block_size tokens: each maskable token is chosen with probability mask_prob; y holds the
    chosen tokens' labels and IGNORE elsewhere; chosen inputs become the mask token (strategy helm) or, as BERT
    does, the mask token 80%, a random maskable token 10%, unchanged 10% (strategy bert). Two uniform numbers per
    token decide: whether it is chosen, and what its input becomes."""

    extra_tokens = 0
    draws = 2

    def __init__(self, rules: LabelRules, mask_prob: float, strategy: str):
        self.rules, self.mask_prob, self.strategy = rules, mask_prob, strategy

    def __call__(self, rows: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        choose, kind = uniforms  # (B, T) each
        rules = self.rules
        chosen = rules.maskable[rows] & (choose < self.mask_prob)  # (B, T)
        y = torch.where(chosen, rules.table[rows], IGNORE)  # (B, T)
        to_mask = chosen if self.strategy == "helm" else chosen & (kind < 0.8)  # (B, T)
        x = torch.where(to_mask, rules.mask_id, rows)  # (B, T)
        if self.strategy == "bert":
            candidates = rules.maskable.nonzero().squeeze(1)  # (M,)
            pick = ((kind - 0.8) / 0.1 * len(candidates)).long().clamp(0, len(candidates) - 1)  # (B, T)
            x = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), candidates[pick], x)  # (B, T)
        return x, y


def batching(rules: LabelRules, train: Trainconfig, config: LLMconfig) -> Masking:
    """Masking under the dataset's rules, which must name a mask token."""
    if rules.mask_id is None:
        raise ConfigError(f"objective=mlm needs a tokenizer with a <mask> token, but the dataset uses "
                          f"{rules.tokenizer!r}; prepare it with --tokenizer nuc, 3mer or 6mer")
    return Masking(rules, train.mask_prob, train.mask_strategy)


MLM = ObjectiveKind("mlm", MaskedTokenLoss, batching, causal=False, needs_rules=True,
                    generation_refusal="objective='mlm' is bidirectional (a masked LM): it has no generation cache and "
                                       "does not generate text; evaluate it with python -m llm.eval fasta")
