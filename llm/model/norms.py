"""Normalisation layers, chosen by the config's `norm` string."""
from torch import nn

from ..config import LLMconfig

NORMS = {
    "layer": lambda dim, config: nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias),
    "rms": lambda dim, config: nn.RMSNorm(dim, eps=config.norm_eps),
}


def build_norm(config: LLMconfig, dim: int | None = None) -> nn.Module:
    """The configured norm over `dim` features (n_embd by default)."""
    return NORMS[config.norm](dim or config.n_embd, config)
