"""Multi-head attention with a configurable number of key/value heads: the kinds mha, mqa and gqa in one class."""
import torch
from torch import nn

from ...config import BlockConfig, LLMconfig, require
from ..cache import TokenCache, WindowCache
from ..kinds import MixerKind
from ..positions import RopeScaling, apply_rope, rope_angles
from ..shortcuts import scalars
from .attention import SlidingWindow, causal_attention, check_heads, check_window


class KVCache(TokenCache):
    """Keys and values of one layer: (B, max_len, n_kv, head_size) each, so memory grows with n_kv."""

    def __init__(self, batch: int, max_len: int, n_kv: int, head_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__(batch, max_len, [(n_kv, head_size)] * 2, dtype, device)


def head_size(block: BlockConfig, config: LLMconfig) -> int:
    """The width of each head: head_dim, or n_embd // n_head when unset."""
    return block.head_dim or config.n_embd // block.n_head


def kv_heads(block: BlockConfig) -> int:
    """Key/value heads: n_head for mha, one for mqa, n_kv_heads for gqa."""
    return {"mha": block.n_head, "mqa": 1, "gqa": block.n_kv_heads}[block.attn]


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with n_head query heads sharing n_kv heads of keys and values.

    One fused projection produces q (n_head heads), k and v (n_kv heads each) of head size `head_dim` (unset:
    n_embd // n_head); c_proj maps the n_head heads back to n_embd. RoPE, when configured, rotates q and k.
    `qkv_bias` adds biases to q, k and v without --bias (Qwen2); `qk_norm` RMS-normalises each query and key head
    before RoPE (Qwen3). With a `window`, each query sees only the keys of the last window tokens, and generation
    keeps only those keys (a ring, `WindowCache`).
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.n_head, self.n_kv = block.n_head, kv_heads(block)
        self.head_size = head_size(block, config)
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.head_size,
                                bias=config.bias or block.qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps) if block.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps) if block.qk_norm else None
        self.c_proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.causal = True  # set by the model from its objective (False: bidirectional, masked LM)
        self.dropout, self.backend = config.dropout, config.attn_backend
        self.rope_theta = config.rope_theta if config.pos_emb == "rope" else None
        self.rope_scaling = RopeScaling.of(config)
        self.window = SlidingWindow(block.window, config.window_unit)
        # --value_embeds: v <- l0 * v + l1 * ve (l1 unused in layers without a value embedding)
        self.value_lambdas = scalars([0.5, 0.5]) if config.value_embeds else None

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache | WindowCache:
        if self.window.size is not None:
            return WindowCache(batch, self.window.size, max_len, [(self.n_kv, self.head_size)] * 2, dtype, device)
        return KVCache(batch, max_len, self.n_kv, self.head_size, dtype, device)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries (B, T, H, hs), keys and values (B, T, KV, hs) each, of x (B, T, C)."""
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.c_attn(x).split([self.n_head * hs, self.n_kv * hs, self.n_kv * hs], dim=-1)
        return q.view(B, T, self.n_head, hs), k.view(B, T, self.n_kv, hs), v.view(B, T, self.n_kv, hs)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | WindowCache | None = None, value_embed: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) at positions (B or 1, T); with a cache, attends over the cached keys and values as well; with
        value lambdas (--value_embeds) the values are mixed with the layer's value embedding (B, T, KV * hs)."""
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.heads(x)  # (B, T, H, hs), (B, T, KV, hs) twice
        if self.value_lambdas is not None:
            v = self.value_lambdas[0] * v  # (B, T, KV, hs)
            if value_embed is not None:
                v = v + self.value_lambdas[1] * value_embed.view_as(v)  # (B, T, KV, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over hs
        if self.rope_theta is not None:
            cos, sin = rope_angles(positions, hs, self.rope_theta, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        window = self.window.current()
        if isinstance(cache, WindowCache):  # held keys are out of order: the mask says which ones each query sees
            (k, v), mask = cache.append(k, v, window=window, mask=mask,
                                        unit=self.window.unit)  # (B, S, KV, hs) each, (B, 1, T, S)
            window = None
        elif cache is not None:
            k, v = cache.append(k, v)  # (B, S, KV, hs) each
        y = causal_attention(q, k, v, self.backend, self.dropout if self.training else 0.0, mask,
                             causal=self.causal, window=window, window_unit=self.window.unit)  # (B, T, H, hs)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, self.n_head * hs)))  # (B, T, C)


def validate(block: BlockConfig, config: LLMconfig) -> None:
    """Heads divide the width (or head_dim is set); gqa's n_kv_heads divide n_head; RoPE needs an even head size; a
    window is >= 1."""
    check_heads(block, config, own_head_dim=True)
    check_window(block)
    if block.attn == "gqa":
        require(block.n_kv_heads is not None, "attn=gqa needs n_kv_heads; set --n_kv_heads (a divisor of n_head)")
        require(block.n_kv_heads >= 1 and block.n_head % block.n_kv_heads == 0,
                f"n_kv_heads={block.n_kv_heads} does not divide n_head={block.n_head}; choose a divisor of n_head")
    if config.pos_emb == "rope":
        size = head_size(block, config)
        require(size % 2 == 0, f"pos_emb=rope needs an even head size, got {size} (head_dim, or n_embd/n_head "
                               "when unset); change head_dim, n_head or n_embd")


MHA = MixerKind("mha", GroupedQueryAttention, validate, {"mha": dict(attn="mha", n_head=4),
                                                         "mha_qkv_bias_qk_norm": dict(attn="mha", n_head=4,
                                                                                      qkv_bias=True, qk_norm=True)})
MQA = MixerKind("mqa", GroupedQueryAttention, validate, {"mqa": dict(attn="mqa", n_head=4),
                                                         "mqa_window": dict(attn="mqa", n_head=4, window=3)})
GQA = MixerKind("gqa", GroupedQueryAttention, validate, {"gqa": dict(attn="gqa", n_head=6, n_kv_heads=2),
                                                         "gqa_window": dict(attn="gqa", n_head=6, n_kv_heads=2,
                                                                            window=5),
                                                         "gqa_head_dim": dict(attn="gqa", n_head=5, n_kv_heads=1,
                                                                              head_dim=14, qk_norm=True)})
