"""Multi-head latent attention (MLA) as in DeepSeek-V2/V3."""
import math

import torch
from torch import nn

from ...config import BlockConfig, LLMconfig, require
from ..cache import TokenCache, WindowCache
from ..kinds import MixerKind, attention_flops
from ..positions import RopeScaling, apply_rope, rope_angles, softmax_mscale
from .attention import SlidingWindow, causal_attention, check_heads, check_window


class LatentCache(TokenCache):
    """MLA's compressed cache: per token the normalised key/value latent (kv_latent_dim) and the rotated rope key
    shared by all heads (rope_head_dim); keys and values are never materialised."""

    def __init__(self, batch: int, max_len: int, latent_dim: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(batch, max_len, [(latent_dim,), (rope_dim,)], dtype, device)


def evens_then_odds(x: torch.Tensor) -> torch.Tensor:
    """The last dimension (..., d) reordered as its even-indexed entries, then its odd-indexed ones."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)  # (..., d)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention.

    Dimensions: n_head heads H; qk_nope_head_dim dn for the non-rotary query/key part and v_head_dim dv for values
    (each n_embd // H when unset); rope_head_dim dr for the decoupled rotary part (0 without RoPE); q_latent_dim dq
    (0: queries are projected directly); kv_latent_dim dc for the joint key/value latent.

    Queries: x -> (down to dq -> RMSNorm ->) up to H * (dn + dr). Keys and values: x -> [latent dc | rope key dr];
    the RMS-normed latent is up-projected to H * (dn + dv) (per head: key part, value). The single rope key is
    shared by all heads. Scores use scale 1/sqrt(dn + dr); the output projection mixes the H * dv values. With
    `rope_interleave` the rotary dimensions pair as (0, 1), (2, 3), ... (DeepSeek-V3's checkpoints): they are
    reordered to evens then odds before the usual rotation, which changes no score since queries and keys move alike.

    With a cache (generation) only the normalised latent and the rotated rope key are stored per token, and
    attention runs in the absorbed form: the key up-projection is folded into the queries and the value
    up-projection into the output, so every head attends over the shared latent (DeepSeek-V2, section 2.1.3).
    The folded weights are views of kv_up's, so they always match the trained ones.

    With a `window`, each query sees only the last window tokens, and generation keeps only their latents and rope
    keys (a ring, `WindowCache`).

    RoPE scaling (`--rope_scaling`) rotates the rope parts with the scaled frequencies; under yarn with
    rope_mscale_all_dim the softmax scale is also multiplied by DeepSeek's mscale^2 (`positions.softmax_mscale`).
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.n_head = block.n_head
        self.nope_dim = block.qk_nope_head_dim or config.n_embd // block.n_head
        self.v_dim = block.v_head_dim or config.n_embd // block.n_head
        self.rope_dim = block.rope_head_dim if config.pos_emb == "rope" else 0
        self.rope_interleave = block.rope_interleave
        self.kv_latent_dim = block.kv_latent_dim
        qk_dim = self.nope_dim + self.rope_dim
        if block.q_latent_dim:
            self.q_proj = nn.Sequential(
                nn.Linear(config.n_embd, block.q_latent_dim, bias=config.bias),
                nn.RMSNorm(block.q_latent_dim, eps=config.norm_eps),
                nn.Linear(block.q_latent_dim, self.n_head * qk_dim, bias=False),
            )
        else:
            self.q_proj = nn.Linear(config.n_embd, self.n_head * qk_dim, bias=False)
        self.kv_down = nn.Linear(config.n_embd, self.kv_latent_dim + self.rope_dim, bias=config.bias)
        self.kv_norm = nn.RMSNorm(self.kv_latent_dim, eps=config.norm_eps)
        self.kv_up = nn.Linear(self.kv_latent_dim, self.n_head * (self.nope_dim + self.v_dim), bias=False)
        self.c_proj = nn.Linear(self.n_head * self.v_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.causal = True  # set by the model from its objective (False: bidirectional, masked LM)
        self.dropout, self.backend, self.rope_theta = config.dropout, config.attn_backend, config.rope_theta
        self.rope_scaling = RopeScaling.of(config)
        self.scale = softmax_mscale(config) / math.sqrt(qk_dim)  # 1 / sqrt(dn + dr), times DeepSeek's yarn mscale^2
        self.window = SlidingWindow(block.window, config.window_unit)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device) -> LatentCache | WindowCache:
        if self.window.size is not None:
            shapes = [(self.kv_latent_dim,), (self.rope_dim,)]
            return WindowCache(batch, self.window.size, max_len, shapes, dtype, device)
        return LatentCache(batch, max_len, self.kv_latent_dim, self.rope_dim, dtype, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LatentCache | WindowCache | None = None) -> torch.Tensor:
        """x (B, T, C) at positions (B or 1, T); with a cache, attends over the cached latents as well."""
        B, T, _ = x.shape
        H, dn, dv, dr = self.n_head, self.nope_dim, self.v_dim, self.rope_dim
        q_nope, q_rope = self.q_proj(x).view(B, T, H, dn + dr).split([dn, dr], dim=-1)  # (B, T, H, dn), (B, T, H, dr)
        latent, k_rope = self.kv_down(x).split([self.kv_latent_dim, dr], dim=-1)  # (B, T, dc), (B, T, dr)
        latent = self.kv_norm(latent)
        if dr:
            if self.rope_interleave:
                q_rope, k_rope = evens_then_odds(q_rope), evens_then_odds(k_rope)  # (B, T, H, dr), (B, T, dr)
            cos, sin = rope_angles(positions, dr, self.rope_theta, self.rope_scaling)
            q_rope = apply_rope(q_rope, cos, sin)  # (B, T, H, dr)
            k_rope = apply_rope(k_rope.view(B, T, 1, dr), cos, sin).view(B, T, dr)  # one rope key for all heads
        dropout, window = self.dropout if self.training else 0.0, self.window.current()
        if cache is None:
            k_nope, v = self.kv_up(latent).view(B, T, H, dn + dv).split([dn, dv], dim=-1)  # (B, T, H, dn), (.., dv)
            q = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, H, dn + dr)
            k = torch.cat((k_nope, k_rope[:, :, None].expand(B, T, H, dr)), dim=-1)  # (B, T, H, dn + dr)
            y = causal_attention(q, k, v, self.backend, dropout, mask, scale=self.scale, causal=self.causal,
                                 window=window, window_unit=self.window.unit)  # (B, T, H, dv)
        else:
            if isinstance(cache, WindowCache):  # held latents are out of order: the mask says which each query sees
                (latent, k_rope), mask = cache.append(latent, k_rope, window=window, mask=mask,
                                                    unit=self.window.unit)  # (B, S, ...), mask
                window = None
            else:
                latent, k_rope = cache.append(latent, k_rope)  # (B, S, dc), (B, S, dr)
            w_k, w_v = self.kv_up.weight.view(H, dn + dv, self.kv_latent_dim).split([dn, dv], dim=1)  # (H, d., dc)
            q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_k)  # (B, T, H, dc)
            q = torch.cat((q_latent, q_rope), dim=-1)  # (B, T, H, dc + dr)
            k = torch.cat((latent, k_rope), dim=-1)[:, :, None]  # (B, S, 1, dc + dr): one "head" shared by all
            y_latent = causal_attention(q, k, latent[:, :, None], self.backend, dropout, mask,
                                        scale=self.scale, window=window)  # (B, T, H, dc)
            y = torch.einsum("bthc,hdc->bthd", y_latent, w_v)  # (B, T, H, dv)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, H * dv)))  # (B, T, C)


def validate(block: BlockConfig, config: LLMconfig) -> None:
    """A key/value latent is required; head widths >= 1; with RoPE an even rope_head_dim, and no flash-attn (q/k
    wider than v)."""
    check_heads(block, config)
    for name in ("qk_nope_head_dim", "v_head_dim"):
        value = getattr(block, name)
        require(value is None or value >= 1, f"{name}={value} must be >= 1 (unset: n_embd // n_head)")
    check_window(block)
    require(block.kv_latent_dim is not None and block.kv_latent_dim >= 1,
            f"attn=mla needs kv_latent_dim >= 1, got {block.kv_latent_dim}; set --kv_latent_dim")
    require(block.q_latent_dim is None or block.q_latent_dim >= 0,
            f"q_latent_dim={block.q_latent_dim} must be >= 0 (0 or unset: no query compression)")
    if config.pos_emb == "rope":
        require(config.attn_backend != "flash",
                "attn=mla with pos_emb=rope has query/key heads wider than value heads, which flash-attn does not "
                "run; use --attn_backend auto")
        require(block.rope_head_dim is not None and block.rope_head_dim >= 2 and block.rope_head_dim % 2 == 0,
                f"attn=mla with pos_emb=rope needs an even rope_head_dim >= 2, got {block.rope_head_dim}; "
                "set --rope_head_dim")


def mixing_flops(block: BlockConfig, config: LLMconfig) -> float:
    """Attention over block_size keys (the window's when set) with query/key heads of dn + dr and value heads of dv
    (training's form: keys and values expanded from the latent)."""
    head = config.n_embd // block.n_head
    rope = block.rope_head_dim if config.pos_emb == "rope" else 0
    keys = min(block.window or config.block_size, config.block_size)
    return attention_flops(keys, block.n_head, (block.qk_nope_head_dim or head) + rope, block.v_head_dim or head)


MLA = MixerKind("mla", MultiHeadLatentAttention, validate, {
    "mla": dict(attn="mla", n_head=4, q_latent_dim=24, kv_latent_dim=16, rope_head_dim=8),
    "mla_no_q_latent": dict(attn="mla", n_head=4, kv_latent_dim=16, rope_head_dim=4),
    "mla_head_dims": dict(attn="mla", n_head=4, q_latent_dim=24, kv_latent_dim=16, rope_head_dim=8,
                          qk_nope_head_dim=16, v_head_dim=8, rope_interleave=True),
    "mla_window": dict(attn="mla", n_head=4, q_latent_dim=24, kv_latent_dim=16, rope_head_dim=8, window=4),
}, mixing_flops=mixing_flops)
