"""Positional information: learned or sinusoidal tables added to the embeddings, or rotary (RoPE) angles."""
import math

import torch
from torch import nn

from ..config import LLMconfig


class LearnedPositions(nn.Module):
    """A learned table of block_size position vectors, added to the token embeddings."""

    def __init__(self, config: LLMconfig):
        super().__init__()
        self.table = nn.Embedding(config.block_size, config.n_embd)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Vectors for positions (B or 1, T)."""
        return self.table(positions)  # (B or 1, T, C)


class SinusoidalPositions(nn.Module):
    """The fixed sine/cosine table of 'Attention Is All You Need', added to the token embeddings."""

    def __init__(self, config: LLMconfig):
        super().__init__()
        position = torch.arange(config.block_size, dtype=torch.float32)[:, None]  # (T, 1)
        rates = torch.exp(torch.arange(0, config.n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / config.n_embd))
        table = torch.zeros(config.block_size, config.n_embd)
        table[:, 0::2] = torch.sin(position * rates)
        table[:, 1::2] = torch.cos(position * rates[: config.n_embd // 2])
        self.register_buffer("table", table, persistent=False)  # (block_size, C)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Vectors for positions (B or 1, T)."""
        return self.table[positions]  # (B or 1, T, C)


POSITIONS = {"learn": LearnedPositions, "sin": SinusoidalPositions}


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions (B or 1, T), each (B or 1, T, 1, dim), in fp32.

    Computed on the fly (a T x dim/2 outer product, negligible next to attention) so no buffer has to
    follow the model across devices, meta initialisation or checkpoints.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
    inv_freq = 1.0 / (theta ** exponents)  # (dim/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B or 1, T, dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B or 1, T, 1, dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, T, H, dim) by the angles, pairing dimension i with i + dim/2 (the Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, T, H, dim)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).type_as(x)
