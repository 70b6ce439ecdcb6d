"""Inference caches: per-token tensors of one layer (what each mixer kind stores is declared in its file), and the
batch bookkeeping shared by all layers."""
from dataclasses import dataclass

import torch


class TokenCache:
    """Per-token tensors of one layer for B rows, (B, max_len, *shape) each, filled left to right."""

    def __init__(self, batch: int, max_len: int, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device):
        self.tensors = [torch.zeros(batch, max_len, *shape, dtype=dtype, device=device) for shape in shapes]
        self.length = 0

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stores the new tensors (B, T, *shape) after the cached ones and returns everything cached so far."""
        start, self.length = self.length, self.length + new[0].size(1)
        for cached, tensor in zip(self.tensors, new):
            cached[:, start:self.length] = tensor
        return tuple(cached[:, :self.length] for cached in self.tensors)  # (B, S, *shape) each

    def nbytes_per_token(self) -> int:
        """Bytes one token adds to this cache."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors)


@dataclass
class Cache:
    """The caches of all layers for a batch of left-padded rows: `length` positions are filled, and row b's first
    pad[b] positions are padding that no query may attend to."""

    layers: list
    length: int
    pad: torch.Tensor  # (B,) left-padding tokens per row
    padded: bool  # whether any row has padding (decided once, so the forward pass needs no host sync)

    def truncate(self, length: int) -> None:
        """Forgets every position from `length` on (speculative decoding's rejected drafts) in every layer."""
        for layer in self.layers:
            layer.length = length
        self.length = length

    def positions(self, T: int) -> torch.Tensor:
        """Positions (B, T) of the next T tokens of each row, counted from its first real token."""
        steps = torch.arange(self.length, self.length + T, device=self.pad.device)  # (T,)
        return (steps[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)

    def mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, S) attention mask of the next T queries over all S = length + T keys, or None without padding.

        A query sees causally earlier real tokens; a padding query sees itself, so no softmax row is empty.
        """
        if not self.padded:
            return None
        S = self.length + T
        query = torch.arange(self.length, S, device=self.pad.device)[:, None]  # (T, 1)
        key = torch.arange(S, device=self.pad.device)[None, :]  # (1, S)
        real_key = key[None] >= self.pad[:, None, None]  # (B, 1, S)
        return ((key <= query)[None] & real_key | (key == query)[None])[:, None]  # (B, 1, T, S)
