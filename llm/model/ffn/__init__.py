"""Feed-forward kinds, chosen by the layer's `moe` switch."""
from torch import nn

from ...config import BlockConfig, ConfigError, LLMconfig
from .mlp import MLP

FFN = {"dense": MLP}


def build_ffn(block: BlockConfig, config: LLMconfig) -> nn.Module:
    """The layer's feed-forward module: dense MLP, or Mixture-of-Experts when `moe` is set."""
    kind = "moe" if block.moe else "dense"
    if kind not in FFN:
        raise ConfigError("moe=true: Mixture-of-Experts layers are not available in this version; use --no_moe")
    return FFN[kind](block, config)
