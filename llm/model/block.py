"""One pre-norm transformer layer."""
import torch
from torch import nn

from ..config import BlockConfig, LLMconfig
from .attention import ATTENTION
from .ffn import MoEStats, build_ffn
from .norms import build_norm


class Block(nn.Module):
    """x + attention(norm(x)), then x + ffn(norm(x)), with the layer's own attention and feed-forward kinds.

    Returns the new residual stream and, for an MoE layer, its balance loss and expert loads (None for a dense one).
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.moe = block.moe
        self.ln_1 = build_norm(config)
        self.attn = ATTENTION[block.attn](block, config)
        self.ln_2 = build_norm(config)
        self.ffn = build_ffn(block, config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache=None) -> tuple[torch.Tensor, MoEStats | None]:
        """x (B, T, C) at positions (B or 1, T); mask and cache as in the attention modules."""
        x = x + self.attn(self.ln_1(x), positions, mask, cache)  # (B, T, C)
        if not self.moe:
            return x + self.ffn(self.ln_2(x)), None  # (B, T, C)
        h, stats = self.ffn(self.ln_2(x))  # (B, T, C)
        return x + h, stats
