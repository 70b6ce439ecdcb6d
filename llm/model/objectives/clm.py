"""`objective: clm`, causal language modelling: each position predicts the next token."""
import torch

from ...config import LLMconfig, Trainconfig
from ...targets import LabelRules
from ..kinds import ObjectiveKind
from .token_loss import TokenLoss


class NextToken:
    """Batching of rows of block_size + 1 tokens: x = row[:-1], y = row[1:] through the dataset's label table (its
    ignored ids become IGNORE), or the tokens themselves without rules."""

    extra_tokens = 1
    draws = 0

    def __init__(self, rules: LabelRules | None):
        self.table = None if rules is None else rules.table

    def __call__(self, rows: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        targets = rows[:, 1:] if self.table is None else self.table[rows[:, 1:]]  # (B, T)
        return rows[:, :-1], targets


def batching(rules: LabelRules | None, train: Trainconfig, config: LLMconfig) -> NextToken:
    """Next-token batching under the dataset's rules."""
    return NextToken(rules)


CLM = ObjectiveKind("clm", TokenLoss, batching, nats_per_token=True)
