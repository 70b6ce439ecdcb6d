"""Batches of random windows from a prepared, memory-mapped token file."""
import json
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError


def read_meta(folder: Path, dataset: str) -> dict:
    """The dataset's meta.json, or a clear error with the command that prepares it."""
    path = folder / "meta.json"
    if not path.is_file():
        raise ConfigError(f"dataset={dataset!r}: {path} not found; prepare it first with "
                          f"`python -m llm.data.prepare {dataset} --out {folder}`")
    return json.loads(path.read_text())


class RandomWindows:
    """(x, y) batches of batch_size windows of block_size tokens at random offsets, y = x shifted by one."""

    def __init__(self, path: Path, dtype: str, batch_size: int, block_size: int, device: torch.device, seed: int):
        self.path, self.dtype = path, np.dtype(dtype)
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.generator = torch.Generator().manual_seed(seed)
        n_tokens = path.stat().st_size // self.dtype.itemsize
        if n_tokens <= block_size:
            raise ConfigError(f"{path} holds {n_tokens} tokens, too few for block_size={block_size}; lower --block_size")
        self.n_windows = n_tokens - block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.path, dtype=self.dtype, mode="r")  # reopened each batch so pages are not kept
        starts = torch.randint(self.n_windows, (self.batch_size,), generator=self.generator).tolist()
        rows = np.stack([data[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)  # (B, T + 1)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)
