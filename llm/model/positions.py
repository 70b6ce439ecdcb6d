"""Positional information: learned or sinusoidal tables added to the embeddings, or rotary (RoPE) angles."""
import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling (LLMconfig.rope_scaling and its rope_* parameters) with the unset ones resolved."""

    kind: str  # linear, llama3 or yarn
    factor: float
    original: int  # the pretraining context length
    low_freq_factor: float
    high_freq_factor: float
    beta_fast: float
    beta_slow: float
    attention_factor: float  # cos and sin are multiplied by it (yarn; 1 otherwise)

    @staticmethod
    def of(config: LLMconfig) -> "RopeScaling | None":
        """The model's RoPE scaling; None without RoPE or without scaling."""
        if config.pos_emb != "rope" or config.rope_scaling == "none":
            return None
        return RopeScaling(config.rope_scaling, config.rope_factor,
                           config.rope_original_max_position_embeddings or config.block_size,
                           config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_beta_fast,
                           config.rope_beta_slow, yarn_attention_factor(config))


def yarn_mscale(factor: float, m: float) -> float:
    """YaRN's magnitude scale 0.1 m ln(factor) + 1 (1 when the context is not extended, factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_attention_factor(config: LLMconfig) -> float:
    """The factor yarn multiplies cos and sin by: rope_attention_factor if set, else from the mscales (1 for other
    scalings)."""
    if config.rope_scaling != "yarn":
        return 1.0
    if config.rope_attention_factor is not None:
        return config.rope_attention_factor
    if config.rope_mscale and config.rope_mscale_all_dim:
        return yarn_mscale(config.rope_factor, config.rope_mscale) / yarn_mscale(config.rope_factor,
                                                                                 config.rope_mscale_all_dim)
    return yarn_mscale(config.rope_factor, 1.0)


def softmax_mscale(config: LLMconfig) -> float:
    """The factor DeepSeek's MLA (transformers' DeepseekV2/V3 attention) multiplies its softmax scale by under yarn
    with rope_mscale_all_dim m_all: (0.1 m_all ln f + 1)^2, f = rope_factor; 1 otherwise. DeepSeek-V3's configs set
    rope_mscale = rope_mscale_all_dim, so cos/sin stay unscaled and this factor alone sharpens the logits."""
    if config.pos_emb != "rope" or config.rope_scaling != "yarn" or not config.rope_mscale_all_dim:
        return 1.0
    return yarn_mscale(config.rope_factor, config.rope_mscale_all_dim) ** 2


def scaled_frequencies(inv_freq: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """The rotation frequencies (dim/2,) of RoPE scaling `s` from the unscaled ones 1 / theta^(2i/dim)."""
    if s.kind == "linear":  # position interpolation: positions / factor
        return inv_freq / s.factor
    if s.kind == "llama3":  # long wavelengths interpolated, short ones kept, a linear blend in 1/wavelength between
        wavelength = 2 * math.pi / inv_freq  # (dim/2,)
        smooth = (s.original / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq  # (dim/2,)
        kept = torch.where(wavelength > s.original / s.low_freq_factor, inv_freq / s.factor, blended)
        return torch.where(wavelength < s.original / s.high_freq_factor, inv_freq, kept)
    # yarn: dimension d of the unscaled rotation makes original / (2 pi theta^(2d/dim)) turns over the original
    # context; dimensions making more than beta_fast turns are kept, fewer than beta_slow interpolated, a ramp between
    low, high = (dim * math.log(s.original / (turns * 2 * math.pi)) / (2 * math.log(theta))
                 for turns in (s.beta_fast, s.beta_slow))
    low, high = max(math.floor(low), 0), min(math.ceil(high), dim - 1)
    high = high + 0.001 if high == low else high
    index = torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device)  # (dim/2,)
    interpolated = ((index - low) / (high - low)).clamp(0, 1)  # (dim/2,) 0: kept, 1: divided by factor
    return inv_freq / s.factor * interpolated + inv_freq * (1 - interpolated)


def rope_angles(positions: torch.Tensor, dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions (B or 1, T), each (B or 1, T, 1, dim), in fp32, with the
    frequencies of RoPE `scaling` (None: unscaled) and cos/sin multiplied by its attention factor.

    Computed on the fly (a T x dim/2 outer product, negligible next to attention) so no buffer has to
    follow the model across devices, meta initialisation or checkpoints.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
    inv_freq = 1.0 / (theta ** exponents)  # (dim/2,)
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, dim, theta, scaling)  # (dim/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B or 1, T, dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B or 1, T, 1, dim)
    if scaling is None or scaling.attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scaling.attention_factor, angles.sin() * scaling.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, T, H, dim) by the angles, pairing dimension i with i + dim/2 (the Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, T, H, dim)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).type_as(x)
