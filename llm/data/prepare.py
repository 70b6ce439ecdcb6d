"""Prepare a dataset: tokenize a text corpus into train.bin / val.bin (uint16 or uint32) and meta.json.

    python -m llm.data.prepare shakespeare_char                  # downloads Tiny Shakespeare, char tokens
    python -m llm.data.prepare shakespeare --source input.txt    # a local copy, GPT-2 tokens
"""
import hashlib
import json
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from ..config import ConfigError, exit_on_user_error
from ..files import write_atomically
from .tokenizers import CharTokenizer, GPT2Tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}  # name -> default tokenizer


@dataclass
class PrepareArgs:
    """Tokenize a corpus into data/NAME/{train,val}.bin and meta.json."""

    name: tyro.conf.Positional[Literal["shakespeare_char", "shakespeare"]]
    """Dataset to prepare."""
    tokenizer: Literal["char", "gpt2"] | None = None
    """Tokenizer (default: char for shakespeare_char, gpt2 for shakespeare)."""
    source: str | None = None
    """A local copy of the corpus (default: download it)."""
    out: str | None = None
    """Output folder (default: data/NAME)."""
    val_fraction: float = 0.1
    """Fraction of the text, taken from the end, held out for validation."""


def read_source(source: str | None) -> str:
    if source is not None:
        if not Path(source).is_file():
            raise ConfigError(f"--source={source!r}: no such file; pass the path of the Tiny Shakespeare input.txt")
        return Path(source).read_text(encoding="utf-8")
    try:
        data = urllib.request.urlopen(SHAKESPEARE_URL, timeout=30).read()
    except OSError as e:
        raise ConfigError(f"could not download {SHAKESPEARE_URL} ({e}); pass --source PATH to a local copy") from None
    if hashlib.md5(data).hexdigest() != SHAKESPEARE_MD5:
        raise ConfigError(f"the download from {SHAKESPEARE_URL} has an unexpected checksum; pass --source PATH")
    return data.decode("utf-8")


def prepare(args: PrepareArgs) -> Path:
    """Writes the dataset and returns its folder."""
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val_fraction={args.val_fraction} must be in (0, 1)")
    text = read_source(args.source)
    kind = args.tokenizer or DATASETS[args.name]
    tokenizer = CharTokenizer.fit(text) if kind == "char" else GPT2Tokenizer()
    split = int(len(text) * (1 - args.val_fraction))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    out = Path(args.out or Path("data") / args.name)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for part, chunk in (("train", text[:split]), ("val", text[split:])):
        ids = np.array(tokenizer.encode(chunk), dtype=dtype)
        write_atomically(out / f"{part}.bin", lambda tmp: tmp.write_bytes(ids.tobytes()))
        counts[f"{part}_tokens"] = len(ids)
    meta = {**tokenizer.meta(), "dtype": np.dtype(dtype).name, **counts, "source": args.source or SHAKESPEARE_URL,
            "md5": hashlib.md5(text.encode("utf-8")).hexdigest()}
    write_atomically(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    print(f"wrote {out}: {counts['train_tokens']:,} train and {counts['val_tokens']:,} val tokens, "
          f"{kind} tokenizer, vocabulary {tokenizer.vocab_size}")
    return out


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        prepare(tyro.cli(PrepareArgs, args=argv, use_underscores=True))


if __name__ == "__main__":
    main(sys.argv[1:])
