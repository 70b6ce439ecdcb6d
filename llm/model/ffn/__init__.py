"""Feed-forward kinds, chosen by the layer's `moe` switch."""
from torch import nn

from ...config import BlockConfig, LLMconfig
from .mlp import MLP
from .moe import MoE, MoEStats

FFN = {"dense": MLP, "moe": MoE}


def build_ffn(block: BlockConfig, config: LLMconfig) -> nn.Module:
    """The layer's feed-forward module: dense MLP, or Mixture-of-Experts when `moe` is set."""
    return FFN["moe" if block.moe else "dense"](block, config)


__all__ = ["FFN", "MLP", "MoE", "MoEStats", "build_ffn"]
