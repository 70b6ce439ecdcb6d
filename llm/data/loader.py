"""Batches of token windows from a prepared, memory-mapped token file, with a state for exact resume."""
import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import ConfigError
from ..targets import Batching
from .prepare import DATASET_NAMES
from .windows import SequenceWindows, WindowOptions, read_documents

DataOrder = Literal["random", "epoch", "windows"]
META_TYPES = {"tokenizer": str, "vocab_size": int, "dtype": str}  # the meta.json keys training reads
TOKEN_DTYPES = ("uint16", "uint32")


def prepare_command(folder: Path, dataset: str) -> str:
    """The command that prepares `dataset` into `folder`."""
    if dataset in ("text", "genomic"):
        return f"python -m llm.data.prepare {dataset} --source PATH_TO_YOUR_FILES --out {folder}"
    if dataset in DATASET_NAMES:
        return f"python -m llm.data.prepare {dataset} --out {folder}"
    return f"python -m llm.data.prepare text --source PATH_TO_YOUR_FILES --out {folder}"


def fingerprint(folder: Path) -> dict:
    """What identifies a prepared dataset without reading its tokens: the hash of its meta.json (which holds its
    source's content hash and the preparation's inputs), each split's size in bytes and the hash of its sequence
    index when it has one. A resume compares it with the one its checkpoint recorded."""
    found = {"meta.json": hashlib.sha256((folder / "meta.json").read_bytes()).hexdigest()}
    for split in ("train", "val"):
        found[f"{split}.bin bytes"] = (folder / f"{split}.bin").stat().st_size
        index = folder / f"{split}.docs.npy"
        if index.is_file():
            found[f"{split}.docs.npy"] = hashlib.sha256(index.read_bytes()).hexdigest()
    return found


def meta_problem(meta) -> str | None:
    """What makes a parsed meta.json unusable for training, or None."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    required = {**META_TYPES, **({"chars": list} if meta.get("tokenizer") == "char" else {})}
    missing = [key for key in required if key not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    wrong = [f"{key} is a {type(meta[key]).__name__}, not {kind.__name__}" for key, kind in required.items()
             if type(meta[key]) is not kind]
    return "; ".join(wrong) or None


def read_meta(folder: Path, dataset: str) -> dict:
    """The dataset's meta.json; a missing, empty, malformed or incomplete one is a one-line error naming the file,
    what is wrong, and the command that prepares the dataset."""
    path = folder / "meta.json"
    if not path.is_file():
        raise ConfigError(f"dataset={dataset!r}: {path} not found; prepare it first with "
                          f"`{prepare_command(folder, dataset)}`")
    text = path.read_bytes().decode("utf-8", errors="replace")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        problem = "is empty" if not text.strip() else f"is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})"
    else:
        problem = meta_problem(meta)
    if problem:
        raise ConfigError(f"dataset={dataset!r}: {path} {problem}; prepare it again with "
                          f"`{prepare_command(folder, dataset)} --force`")
    return meta


def rank_batch(rows: list[np.ndarray], generator: torch.Generator, batching: Batching | None, rank: int,
               batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """This rank's (x, y), each (batch_size, block_size), or (x, y, token_weights), from the rows of a global batch:
    its slice of the rows, made into inputs and targets by the objective's `batching` (None: the tokens and the
    next tokens), with the uniform numbers it asks for drawn from `generator` for the whole global batch (so the
    state depends only on the global batch)."""
    count, length = len(rows), len(rows[0])
    uniforms = None
    if batching is not None and batching.draws:
        uniforms = torch.rand(batching.draws, count, length, generator=generator)  # the global batch's draws
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    batch = torch.from_numpy(np.stack(rows[mine]).astype(np.int64))  # (B, R)
    if batching is None:
        parts = batch[:, :-1], batch[:, 1:]  # (B, T) each
    else:
        parts = batching(batch, None if uniforms is None else uniforms[:, mine])
    if device.type == "cuda":
        return tuple(part.pin_memory().to(device, non_blocking=True) for part in parts)
    return tuple(part.to(device) for part in parts)


class TokenLoader:
    """(x, y) batches of batch_size rows of tokens: by default windows of block_size + 1 tokens with y = x shifted by
    one token; with an objective's `batching` (`llm.targets.Batching`), rows of block_size + batching.extra_tokens
    tokens that it turns into (x, y) (masked-LM inputs, ignored labels) or (x, y, token_weights).

    - order "random": windows at uniformly random offsets, drawn with replacement from a seeded generator.
    - order "epoch": the file cut into non-overlapping windows, visited in a fresh permutation each epoch
      (seeded by seed and epoch), every window exactly once per epoch; a batch may span two epochs.
    - order "windows": the windows of each sequence (`SequenceWindows`: never two sequences in one row, tails
      padded), visited like the epoch order.

    Every rank draws the same global batch of batch_size * world_size rows and keeps its own slice, so the
    union over ranks, and the state, depend only on the global batch: a run can resume on another number of
    ranks. `state_dict()` / `load_state_dict()` save and restore the position and the generator, so a resumed
    run gets the batches an uninterrupted one would.
    """

    def __init__(self, path: Path, dtype: str, batch_size: int, block_size: int, device: torch.device, seed: int,
                 order: DataOrder = "random", rank: int = 0, world_size: int = 1, batching: Batching | None = None,
                 windows: WindowOptions | None = None):
        fix = f"prepare the dataset again with `{prepare_command(path.parent, path.parent.name)} --force`"
        if dtype not in TOKEN_DTYPES:
            raise ConfigError(f"{path.parent / 'meta.json'}: dtype={dtype!r} is not uint16 or uint32; {fix}")
        if not path.is_file():
            raise ConfigError(f"{path} not found; {fix}")
        self.path, self.dtype = path, np.dtype(dtype)
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.order, self.seed, self.rank, self.world_size = order, seed, rank, world_size
        self.batching = batching
        self.row_length = block_size + (1 if batching is None else batching.extra_tokens)
        size = path.stat().st_size
        if size % self.dtype.itemsize:
            raise ConfigError(f"{path}: {size:,} bytes is not a whole number of {dtype} tokens ({self.dtype.itemsize} "
                              f"bytes each): the file is truncated or damaged; {fix}")
        n_tokens = size // self.dtype.itemsize
        if n_tokens < self.row_length:
            raise ConfigError(f"{path} holds {n_tokens} tokens, too few for block_size={block_size}; lower --block_size")
        self.n_offsets = n_tokens - self.row_length + 1  # random windows start at 0 .. n_offsets - 1
        self.sequences = None
        if order == "windows":
            self.sequences = SequenceWindows(read_documents(path, n_tokens), n_tokens, self.row_length, windows)
            self.n_windows = self.sequences.n_windows
        else:  # non-overlapping windows of the epoch order
            self.n_windows = (n_tokens - self.row_length + block_size) // block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # windows of the global stream served so far
        self._permutation = (-1, None)  # (epoch, its permutation), cached

    def _epoch_windows(self, count: int) -> list[int]:
        """Indices of the next `count` windows of the global epoch order."""
        indices = []
        for position in range(self.position, self.position + count):
            epoch, index = divmod(position, self.n_windows)
            if self._permutation[0] != epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._permutation = (epoch, torch.randperm(self.n_windows, generator=generator))
            indices.append(int(self._permutation[1][index]))
        return indices

    def _rows(self, data: np.ndarray, count: int) -> list[np.ndarray]:
        """The next `count` rows of the global stream."""
        R = self.row_length
        if self.order == "random":
            starts = torch.randint(self.n_offsets, (count,), generator=self.generator).tolist()
            return [data[s : s + R] for s in starts]
        windows = self._epoch_windows(count)
        if self.sequences is not None:
            return [self.sequences.row(data, w) for w in windows]
        return [data[w * self.block_size : w * self.block_size + R] for w in windows]

    def global_rows(self, count: int) -> list[np.ndarray]:
        """The next `count` rows of the global stream (all ranks'), each (row_length,)."""
        data = np.memmap(self.path, dtype=self.dtype, mode="r")  # reopened each batch so pages are not kept
        rows = self._rows(data, count)
        self.position += count
        return rows

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This rank's (x, y), each (batch_size, block_size), from the next global batch (with the objective's
        token weights third when its batching gives them)."""
        rows = self.global_rows(self.batch_size * self.world_size)
        return rank_batch(rows, self.generator, self.batching, self.rank, self.batch_size, self.device)

    def state_dict(self) -> dict:
        """Position and generator state (tensors and ints only: loadable with torch.load(weights_only=True))."""
        return {"order": self.order, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict(); a state saved under the other data order is refused."""
        if state["order"] == "mixture":
            raise ConfigError("the checkpoint was trained on a mixture of datasets; resume with its --data_mix")
        if state["order"] != self.order:
            raise ConfigError(f"the saved data order is {state['order']!r} but this run uses {self.order!r}; "
                              f"pass --data_order {state['order']}")
        self.position = state["position"]
        self.generator.set_state(state["generator"])
