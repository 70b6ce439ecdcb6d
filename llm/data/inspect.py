"""Look inside a prepared dataset: its tokenizer and sizes, then a few training windows decoded, with the targets
that never count in the loss marked.

    python -m llm.data.inspect shakespeare_char
    python -m llm.data.inspect genomic_3mer --windows 2 --block_size 32 --loss_mask acgt
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from ..config import ConfigError, exit_on_user_error
from ..targets import IGNORE
from .labels import label_rules
from .loader import read_meta
from .tokenizers import SequenceTokenizer, tokenizer_from_meta
from .windows import documents_path


@dataclass
class InspectArgs:
    """Show a prepared dataset's figures and decode a few windows of its tokens."""

    dataset: tyro.conf.Positional[str]
    """The dataset's name (a folder under --data_dir) or the path of its folder."""
    data_dir: str = "data"
    """Where prepared datasets live (train.py's --data_dir)."""
    split: Literal["train", "val"] = "train"
    """The split the windows are drawn from."""
    windows: int = 3
    """How many windows to decode."""
    block_size: int = 64
    """Tokens per window."""
    seed: int = 0
    """Seed of the windows' random offsets."""
    loss_mask: Literal["none", "acgt"] = "none"
    """As train.py's --loss_mask: with acgt, targets outside ACGT never count (sequence data only)."""
    uppercase_labels: bool = False
    """As train.py's --uppercase_labels: lower-case nucleotides are labelled upper-case (sequence data only)."""


def dataset_folder(args: InspectArgs) -> Path:
    """The folder the dataset argument names: a path (an existing folder, or one with a slash), else a name under
    data_dir."""
    given = Path(args.dataset)
    return given if given.is_dir() or len(given.parts) > 1 else Path(args.data_dir) / args.dataset


def token_shown(tokenizer, i: int) -> str:
    """Token i as text: its letters, or a sequence tokenizer's special token by name; line breaks made visible."""
    if isinstance(tokenizer, SequenceTokenizer):
        text = tokenizer.token_text(i)
        return tokenizer.tokens[i] if text is None else text
    return tokenizer.decode([i]).replace("\n", "\\n").replace("\t", "\\t")


def describe_window(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The window's text, each token whose target never counts in brackets, and how many count."""
    pieces = [f"[{token_shown(tokenizer, i)}]" if label == IGNORE else token_shown(tokenizer, i)
              for i, label in zip(ids, labels)]
    counted = sum(label != IGNORE for label in labels)
    return [f"  {''.join(pieces)}", f"  {counted} of {len(ids)} targets count in the loss"
            + ("; [bracketed] tokens never do" if counted < len(ids) else "")]


def inspect(args: InspectArgs) -> None:
    """Prints the dataset's figures and `args.windows` decoded windows of `args.split`."""
    folder = dataset_folder(args)
    meta = read_meta(folder, folder.name)
    tokenizer = tokenizer_from_meta(meta)
    if not isinstance(tokenizer, SequenceTokenizer) and (args.loss_mask != "none" or args.uppercase_labels):
        raise ConfigError(f"--loss_mask/--uppercase_labels relabel nucleotides, but {folder} uses the "
                          f"{meta['tokenizer']} tokenizer; drop them")
    rules = label_rules(tokenizer, args.loss_mask, args.uppercase_labels)
    print(f"{folder}: {meta['tokenizer']} tokenizer, {meta['vocab_size']:,} ids (largest used "
          f"{meta.get('max_token_id', '?')}), stored as {meta['dtype']}")
    tokens = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        tokens[split] = np.memmap(path, dtype=meta["dtype"], mode="r") if path.is_file() else np.zeros(0, np.uint16)
        line = f"  {split}: {len(tokens[split]):,} tokens"
        if documents_path(path).is_file():
            line += f" in {len(np.load(documents_path(path), mmap_mode='r')):,} sequences"
        print(line)
    if meta.get("source"):
        print(f"  source: {meta['source']}")
    data = tokens[args.split]
    if args.windows < 0 or args.block_size < 1:
        raise ConfigError(f"--windows {args.windows} --block_size {args.block_size}: use windows >= 0, block_size >= 1")
    if len(data) <= args.block_size:
        raise ConfigError(f"the {args.split} split holds {len(data):,} tokens, not more than --block_size "
                          f"{args.block_size}; lower --block_size")
    generator = np.random.default_rng(args.seed)
    for n, start in enumerate(generator.integers(0, len(data) - args.block_size, size=args.windows), start=1):
        ids = [int(i) for i in data[start:start + args.block_size + 1]]
        labels = rules.table[ids[1:]].tolist()  # the target of position t is token t + 1
        print(f"window {n} of {args.split} at token {start:,}, its {args.block_size} targets:")
        print("\n".join(describe_window(tokenizer, ids[1:], labels)))


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        inspect(tyro.cli(InspectArgs, args=argv, use_underscores=True))


if __name__ == "__main__":
    main(sys.argv[1:])
