"""The dense feed-forward kind (`ffn: dense`)."""
import torch
from torch import nn

from ...config import BlockConfig, LLMconfig, require
from ..kinds import FeedForward, FFNKind, FFNOutput
from .activations import activation


class MLP(FeedForward):
    """n_embd -> up_dim -> activation -> n_embd; gated activations use a fused [gate | up] projection of 2 * up_dim."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.act, self.gated = activation(block.non_linearity)
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * block.up_dim, bias=config.bias)
        self.c_proj = nn.Linear(block.up_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output (B, T, C) for x (B, T, C)."""
        h = self.c_fc(x)  # (B, T, up_dim or 2 * up_dim)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up  # (B, T, up_dim)
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)

    def forward(self, x: torch.Tensor) -> FFNOutput:
        return self.no_aux(self.project(x))


def check_width(block: BlockConfig, config: LLMconfig) -> None:
    """up_dim (filled with 4 * n_embd when unset) must be positive."""
    require(block.up_dim is not None and block.up_dim >= 1, f"up_dim={block.up_dim} must be >= 1")


DENSE = FFNKind("dense", MLP, check_width, {"dense": dict(ffn="dense", up_dim=40)})
