"""The dense feed-forward layer."""
import torch
from torch import nn

from ...config import BlockConfig, LLMconfig
from .activations import activation


class MLP(nn.Module):
    """n_embd -> up_dim -> activation -> n_embd; gated activations use a fused [gate | up] projection of 2 * up_dim."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.act, self.gated = activation(block.non_linearity)
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * block.up_dim, bias=config.bias)
        self.c_proj = nn.Linear(block.up_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, up_dim or 2 * up_dim)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up  # (B, T, up_dim)
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)
