"""One pre-norm layer: a sequence mixer and a feed-forward layer, each of the kind its spec names."""
import torch
from torch import nn

from ..config import BlockConfig, LLMconfig
from .ffn.none import NoFeedForward
from .norms import build_norm
from .registry import FFNS, MIXERS


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)), with the layer's own kinds (`attn`, `ffn`); with ffn none the
    second sublayer (its norm included) is left out."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.ln_1 = build_norm(config)
        self.attn = MIXERS[block.attn].build(block, config)
        self.ffn = FFNS[block.ffn].build(block, config)
        self.ln_2 = None if isinstance(self.ffn, NoFeedForward) else build_norm(config)
        self.mixing = MIXERS[block.attn].mixing_flops(block, config)  # FLOPs per token of its mixing without weights

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache=None, value_embed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, T, C) at positions (B or 1, T); mask and cache as in the mixers; the layer's value embedding
        (B, T, width) for the attention kinds that mix one into their values. Returns the new residual stream
        (B, T, C) and the feed-forward layer's auxiliary loss () and stats."""
        extra = () if value_embed is None else (value_embed,)
        x = x + self.attn(self.ln_1(x), positions, mask, cache, *extra)  # (B, T, C)
        if self.ln_2 is None:  # ffn none: the layer is its mixer alone
            return x, x.new_zeros((), dtype=torch.float32), {}
        ffn = self.ffn(self.ln_2(x))
        return x + ffn.out, ffn.aux_loss, ffn.stats  # (B, T, C), (), {name: tensor}

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        """The layer's generation cache: its mixer's."""
        return self.attn.new_cache(batch, max_len, dtype, device)

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
        """The layer's figures from its stats summed over a step (logged as NAME/layerI): its feed-forward layer's."""
        return self.ffn.metrics(stats)

    def skipped_params(self, T: int) -> float:
        """Active parameters that the average token of a length-T sequence skips (0: every token goes through)."""
        return 0.0

    def mixing_flops(self) -> float:
        """FLOPs per training token, forward and backward, of the mixing without weights (MixerKind.mixing_flops)."""
        return self.mixing
