"""A dataset's label rules: which token ids count as targets (padding, special tokens and, under --loss_mask acgt,
labels outside ACGT never do), which of them an objective may corrupt, and the tokenizer's mask token. The
objectives (llm/model/objectives/) turn rows of tokens into inputs and targets with these rules."""
import torch

from ..config import ConfigError
from ..targets import IGNORE, LabelRules

ACGT = frozenset("ACGTacgt")


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


def label_rules(tokenizer, loss_mask: str = "none", uppercase: bool = False) -> LabelRules:
    """The LabelRules of a dataset's tokenizer under the run's --loss_mask and --uppercase_labels."""
    never = sequence_specials(tokenizer)
    maskable = torch.tensor([i not in never for i in range(tokenizer.vocab_size)])
    return LabelRules(label_table(tokenizer, loss_mask, uppercase), maskable, getattr(tokenizer, "mask", None),
                      tokenizer.name)
