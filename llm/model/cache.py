"""Inference caches: per-layer keys and values (MHA/MQA/GQA) or MLA's compressed latent, and the batch bookkeeping."""
from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values of one MHA/MQA/GQA layer: (B, max_len, n_kv, head_size) each, so memory grows with n_kv."""

    def __init__(self, batch: int, max_len: int, n_kv: int, head_size: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(batch, max_len, n_kv, head_size, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new k, v (B, T, n_kv, hs) after the cached ones and returns all keys and values so far."""
        start, self.length = self.length, self.length + k.size(1)
        self.k[:, start:self.length], self.v[:, start:self.length] = k, v
        return self.k[:, :self.length], self.v[:, :self.length]  # (B, S, n_kv, hs) each


class LatentCache:
    """MLA's compressed cache: per token the normalised key/value latent (kv_latent_dim) and the rotated rope key
    shared by all heads (rope_head_dim); keys and values are never materialised."""

    def __init__(self, batch: int, max_len: int, latent_dim: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.latent = torch.zeros(batch, max_len, latent_dim, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device)
        self.length = 0

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores latent (B, T, dc) and k_rope (B, T, dr) after the cached ones and returns all cached so far."""
        start, self.length = self.length, self.length + latent.size(1)
        self.latent[:, start:self.length], self.k_rope[:, start:self.length] = latent, k_rope
        return self.latent[:, :self.length], self.k_rope[:, :self.length]  # (B, S, dc), (B, S, dr)


@dataclass
class Cache:
    """The caches of all layers for a batch of left-padded rows: `length` positions are filled, and row b's first
    pad[b] positions are padding that no query may attend to."""

    layers: list
    length: int
    pad: torch.Tensor  # (B,) left-padding tokens per row
    padded: bool  # whether any row has padding (decided once, so the forward pass needs no host sync)

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
