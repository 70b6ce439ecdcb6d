"""The windows order: rows cut from within each sequence of a token file, never spanning two sequences.

A dataset prepared from sequences (`python -m llm.data.prepare genomic`) stores each sequence as
`<begin> tokens <end>` and, beside each split's token file, `SPLIT.docs.npy`: the token offset where each sequence
starts. A sequence longer than a row is cut into windows that overlap by `overlap` tokens (Hugging Face's
`stride`); the last window of a sequence, and a short sequence, are padded with the padding token.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError


@dataclass(frozen=True)
class WindowOptions:
    """How sequences become rows: the tokens consecutive windows share, and where the begin/end tokens go (every:
    each window gets both, as bionemo's OpenGenome2 recipe does; ends: only a sequence's true start and end)."""

    overlap: int
    specials: str  # "every" or "ends"
    bos: int
    eos: int
    pad: int


def documents_path(tokens: Path) -> Path:
    """The sequence index beside a token file: train.bin -> train.docs.npy."""
    return tokens.with_suffix(".docs.npy")


def read_documents(tokens: Path, n_tokens: int) -> np.ndarray:
    """The start offsets (D,) of the sequences of a token file, checked to be increasing from 0 within the file."""
    path = documents_path(tokens)
    if not path.is_file():
        raise ConfigError(f"data_order=windows needs {path}, the sequence index that `python -m llm.data.prepare "
                          "genomic` writes; prepare the dataset that way, or use --data_order random or epoch")
    try:
        starts = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a readable .npy file ({e}); prepare the dataset again with --force") from None
    ok = starts.ndim == 1 and len(starts) >= 1 and starts[0] == 0 and bool(np.all(np.diff(starts) > 0))
    if not ok or starts[-1] >= n_tokens:
        raise ConfigError(f"{path} does not index {tokens} (offsets must rise from 0 below its {n_tokens} tokens); "
                          "prepare the dataset again with --force")
    return np.asarray(starts, dtype=np.int64)


class SequenceWindows:
    """Every window of every sequence, numbered 0 .. n_windows - 1 sequence by sequence; `row(data, w)` is window w
    as a row of `row_length` tokens."""

    def __init__(self, starts: np.ndarray, n_tokens: int, row_length: int, options: WindowOptions):
        ends = np.append(starts[1:], n_tokens)  # (D,)
        self.options, self.row_length = options, row_length
        if options.specials == "every":  # the content between each sequence's begin and end tokens
            self.begin, self.end, self.capacity = starts + 1, ends - 1, row_length - 2
        else:
            self.begin, self.end, self.capacity = starts, ends, row_length
        self.step = self.capacity - options.overlap
        if self.step < 1:
            raise ConfigError(f"window_stride={options.overlap} must be smaller than the {self.capacity} sequence "
                              f"tokens a window holds (block_size and window_specials={options.specials}); lower it")
        lengths = np.maximum(self.end - self.begin, 0)  # (D,)
        counts = 1 + np.maximum(0, -(-(lengths - self.capacity) // self.step))  # (D,) windows per sequence
        self.first = np.concatenate(([0], np.cumsum(counts)))  # (D + 1,) the first window of each sequence
        self.n_windows = int(self.first[-1])

    def row(self, data: np.ndarray, w: int) -> np.ndarray:
        """Window w: (row_length,) token ids, padded at the end."""
        d = int(np.searchsorted(self.first, w, side="right")) - 1
        start = int(self.begin[d]) + (w - int(self.first[d])) * self.step
        tokens = data[start : min(start + self.capacity, int(self.end[d]))]
        o = self.options
        if o.specials == "every":
            tokens = np.concatenate(([o.bos], tokens, [o.eos]))
        return np.pad(tokens, (0, self.row_length - len(tokens)), constant_values=o.pad)  # (row_length,)
