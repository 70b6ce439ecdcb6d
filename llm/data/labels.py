"""From rows of tokens to (inputs, targets): next-token targets, or masked-LM inputs and targets, with the tokens
that never count in the loss (padding, special tokens, labels outside ACGT under --loss_mask acgt) set to IGNORE."""
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..targets import IGNORE

ACGT = frozenset("ACGTacgt")


@dataclass
class Labels:
    """How a batch of token rows becomes (x, y).

    causal: x = row[:-1], y = row[1:] (rows hold block_size + 1 tokens). Otherwise (masked LM, rows of block_size
    tokens): each maskable token is chosen with probability mask_prob; y holds the chosen tokens' labels and IGNORE
    elsewhere; chosen inputs become `mask_id` (strategy helm) or, as BERT does, `mask_id` 80%, a random maskable
    token 10%, unchanged 10% (strategy bert). `table` (V,) maps each token id to its label id or IGNORE.
    """

    causal: bool
    table: torch.Tensor  # (V,) int64
    maskable: torch.Tensor  # (V,) bool: tokens a masked LM may choose (not special, not padding)
    mask_id: int | None = None
    mask_prob: float = 0.15
    strategy: str = "helm"

    def row_length(self, block_size: int) -> int:
        """Tokens per row: one more than the inputs when the targets are the next tokens."""
        return block_size + 1 if self.causal else block_size

    def random_count(self, rows: int, length: int) -> int:
        """Uniform random numbers make_batch draws for `rows` rows of `length` tokens: (2, rows, length) of them."""
        return 0 if self.causal else 2 * rows * length

    def make_batch(self, rows: torch.Tensor, uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T), from rows (B, R) of token ids; `uniforms` (2, B, R) in [0, 1) decide the masking."""
        if self.causal:
            return rows[:, :-1], self.table[rows[:, 1:]]  # (B, T) each
        choose, kind = uniforms  # (B, T) each
        chosen = self.maskable[rows] & (choose < self.mask_prob)  # (B, T)
        y = torch.where(chosen, self.table[rows], IGNORE)  # (B, T)
        to_mask = chosen if self.strategy == "helm" else chosen & (kind < 0.8)  # (B, T)
        x = torch.where(to_mask, self.mask_id, rows)  # (B, T)
        if self.strategy == "bert":
            candidates = self.maskable.nonzero().squeeze(1)  # (M,)
            pick = ((kind - 0.8) / 0.1 * len(candidates)).long().clamp(0, len(candidates) - 1)  # (B, T)
            x = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), candidates[pick], x)  # (B, T)
        return x, y


def label_table(tokenizer, loss_mask: str, uppercase: bool) -> torch.Tensor:
    """(V,) the label of each token id: itself, or IGNORE for the ids that never count (a sequence tokenizer's
    special tokens and padding; under loss_mask acgt every id whose letters are not all in ACGTacgt); with
    `uppercase`, lower-case nucleotides are labelled with their upper-case ids (ASCII letters only: the upper case
    of a character such as 'ß' or 'ÿ' is no single token of a byte vocabulary, and no nucleotide)."""
    V = tokenizer.vocab_size
    texts = [tokenizer.token_text(i) for i in range(V)] if loss_mask == "acgt" or uppercase else None
    never = sequence_specials(tokenizer)
    table = torch.arange(V)
    for i in range(V):
        if i in never or (loss_mask == "acgt" and (not texts[i] or not set(texts[i]) <= ACGT)):
            table[i] = IGNORE
        elif uppercase and texts[i] and texts[i].isascii() and texts[i] != texts[i].upper():
            upper = tokenizer.encode(texts[i].upper())
            if len(upper) != 1:
                raise ConfigError(f"--uppercase_labels: token {texts[i]!r} has no upper-case token in the "
                                  f"{tokenizer.name} vocabulary; drop --uppercase_labels")
            table[i] = upper[0]
    return table


def sequence_specials(tokenizer) -> frozenset:
    """The ids that never count in a loss: the special tokens of a sequence tokenizer (one that wraps sequences in
    begin/end tokens); none for text tokenizers, whose end-of-text token is predicted like any other."""
    return tokenizer.special_ids if getattr(tokenizer, "bos", None) is not None else frozenset()


def build_labels(tokenizer, causal: bool, loss_mask: str = "none", uppercase: bool = False, mask_prob: float = 0.15,
                 strategy: str = "helm") -> Labels:
    """The Labels of a dataset's tokenizer and the run's options; a masked LM needs a tokenizer with a mask token."""
    table = label_table(tokenizer, loss_mask, uppercase)
    never = sequence_specials(tokenizer)
    maskable = torch.tensor([i not in never for i in range(tokenizer.vocab_size)])
    mask_id = getattr(tokenizer, "mask", None)
    if not causal and mask_id is None:
        raise ConfigError(f"objective=mlm needs a tokenizer with a <mask> token, but the dataset uses "
                          f"{tokenizer.name!r}; prepare it with --tokenizer nuc, 3mer or 6mer")
    return Labels(causal, table, maskable, mask_id, mask_prob, strategy)
