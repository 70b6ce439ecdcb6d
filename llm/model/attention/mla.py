"""Multi-head latent attention (MLA) as in DeepSeek-V2/V3."""
import torch
from torch import nn

from ...config import BlockConfig, LLMconfig
from ..positions import apply_rope, rope_angles
from .kernels import causal_attention


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention.

    Dimensions: n_head heads H; head size hs = n_embd // H for the non-rotary query/key part and for values;
    rope_head_dim dr for the decoupled rotary part (0 without RoPE); q_latent_dim dq (0: queries are projected
    directly); kv_latent_dim dc for the joint key/value latent.

    Queries: x -> (down to dq -> RMSNorm ->) up to H * (hs + dr). Keys and values: x -> [latent dc | rope key dr];
    the RMS-normed latent is up-projected to H * (hs + hs) (per head: key part, value). The single rope key is
    shared by all heads. Scores use scale 1/sqrt(hs + dr); the output projection mixes the heads.
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.n_head, self.head_size = block.n_head, config.n_embd // block.n_head
        self.rope_dim = block.rope_head_dim if config.pos_emb == "rope" else 0
        self.kv_latent_dim = block.kv_latent_dim
        qk_dim = self.head_size + self.rope_dim
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
        self.kv_up = nn.Linear(self.kv_latent_dim, self.n_head * 2 * self.head_size, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout, self.backend, self.rope_theta = config.dropout, config.attn_backend, config.rope_theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, hs, dr = self.n_head, self.head_size, self.rope_dim
        q = self.q_proj(x).view(B, T, H, hs + dr)  # (B, T, H, hs + dr)
        latent, k_rope = self.kv_down(x).split([self.kv_latent_dim, dr], dim=-1)  # (B, T, dc), (B, T, dr)
        k_nope, v = self.kv_up(self.kv_norm(latent)).view(B, T, H, 2 * hs).split([hs, hs], dim=-1)  # (B, T, H, hs) each
        if dr:
            q_nope, q_rope = q.split([hs, dr], dim=-1)
            cos, sin = rope_angles(T, dr, self.rope_theta, x.device)
            q_rope = apply_rope(q_rope, cos, sin)  # (B, T, H, dr)
            k_rope = apply_rope(k_rope.view(B, T, 1, dr), cos, sin).expand(B, T, H, dr)  # shared by all heads
            q = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, H, hs + dr)
            k = torch.cat((k_nope, k_rope), dim=-1)  # (B, T, H, hs + dr)
        else:
            k = k_nope
        y = causal_attention(q, k, v, self.backend, self.dropout if self.training else 0.0)  # (B, T, H, hs)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, H * hs)))  # (B, T, C)
