"""What data and objectives agree on about targets: the ignored target id, a dataset's label rules, and the
contract by which an objective turns a loader's rows of tokens into model inputs and targets."""
from dataclasses import dataclass
from typing import Protocol

import torch

IGNORE = -1  # target id that contributes no loss


@dataclass
class LabelRules:
    """What a dataset says about its tokens as targets (built by `llm.data.labels.label_rules`).

    `table` (V,) int64 maps each token id to its label id, or to IGNORE for the ids that never count (a sequence
    tokenizer's special tokens and padding, labels outside ACGT under --loss_mask acgt); `maskable` (V,) bool marks
    the tokens an objective may corrupt (not special, not padding); `mask_id` is the tokenizer's mask token, if any;
    `tokenizer` names the tokenizer (for messages).
    """

    table: torch.Tensor
    maskable: torch.Tensor
    mask_id: int | None = None
    tokenizer: str = ""


class Batching(Protocol):
    """How an objective makes (inputs, targets) from a loader's rows: rows hold block_size + extra_tokens tokens,
    and for each row the loader draws `draws` uniform numbers in [0, 1) per token from its seeded generator (for
    the whole global batch, so a resumed run, on any number of ranks, draws the same)."""

    extra_tokens: int
    draws: int

    def __call__(self, rows: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(x, y), each (B, block_size), or (x, y, *extras), from rows (B, R) of token ids and uniforms (draws, B,
        R) (None when draws is 0). The extras are passed to the model by the names in the batching's optional
        `extras` attribute (default ("token_weights",): float weights (B, block_size) that multiply each target's
        term of the loss; a diffusion objective's ("time",): each row's diffusion time (B,))."""


def extra_names(batching) -> tuple[str, ...]:
    """The model's keyword for each extra part of the batching's batches (see Batching.__call__)."""
    return getattr(batching, "extras", ("token_weights",))
