"""One pre-norm transformer layer."""
import torch
from torch import nn

from ..config import BlockConfig, LLMconfig
from .attention import ATTENTION
from .ffn import build_ffn
from .norms import build_norm


class Block(nn.Module):
    """x + attention(norm(x)), then x + ffn(norm(x)), with the layer's own attention and feed-forward kinds."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.ln_1 = build_norm(config)
        self.attn = ATTENTION[block.attn](block, config)
        self.ln_2 = build_norm(config)
        self.ffn = build_ffn(block, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.ffn(self.ln_2(x))  # (B, T, C)
