"""`arch: ngpt`, the normalized transformer (Loshchilov et al. 2024, "nGPT: Normalized Transformer with
Representation Learning on the Hypersphere", arXiv:2410.01131).

Embeddings, hidden states and the weights' vectors along the model width live on the unit sphere. A block moves
the hidden state h towards the normalised outputs of its attention and MLP by learned per-channel eigen learning
rates, with no norm layers:

    h <- Norm(h + alpha_A * (Norm(Attn(h)) - h)),    h <- Norm(h + alpha_M * (Norm(MLP(h)) - h))

Attention normalises each head's query and key after RoPE and scales them by s_qk; the softmax scale is
sqrt(d_k). The MLP scales u by s_u and nu by s_nu * sqrt(n_embd) before the gate. The logits are scaled by s_z.
Each learned scaling s is stored at `scale` and used as s * init / scale (the paper's s_init and s_scale).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BlockConfig, LLMconfig, Trainconfig, require
from ..ffn.activations import activation
from ..kinds import ArchKind, FeedForward, FFNOutput, full_attention_flops
from ..llm import LLM
from ..mixers.attention import causal_attention
from ..mixers.gqa import GroupedQueryAttention, KVCache
from ..positions import apply_rope, rope_angles

ATTN_KINDS = ("mha", "mqa", "gqa")
ALPHA_FIELDS = ("ngpt_alpha_attn_init", "ngpt_alpha_mlp_init", "ngpt_alpha_scale")
LOAD_TOLERANCE = 1e-5  # a loaded vector whose norm is within this of 1 is already on the sphere
S_QK_INIT, S_UV_INIT, S_UV_SCALE, S_Z_INIT = 1.0, 1.0, 1.0, 1.0  # the paper's; s_qk and s_z scale by 1/sqrt(n_embd)


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x divided by its L2 norm along `dim` (Norm in the paper)."""
    return F.normalize(x, dim=dim)


class Scaling(nn.Module):
    """A learned vector of `size` scalings, stored at `scale` (its parameter `value`) and used as
    value * init / scale, so it starts at `init` and its step size is multiplied by init / scale."""

    def __init__(self, size: int, init: float, scale: float):
        super().__init__()
        self.value = nn.Parameter(torch.full((size,), scale))
        self.factor = init / scale

    def forward(self) -> torch.Tensor:
        return self.value * self.factor  # (size,)


class NormalizedAttention(GroupedQueryAttention):
    """Attention of the mha/mqa/gqa kinds with unit-norm query and key heads scaled by s_qk (after RoPE) and the
    softmax scale sqrt(head_size); no dropout. q·k = (s_qk q̂)·(s_qk k̂) is computed as (s_qk² q̂)·k̂, the same
    product, so grouped key heads (and the cache) hold unscaled unit keys."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__(block, config)
        self.s_qk = Scaling(self.n_head * self.head_size, S_QK_INIT, 1 / math.sqrt(config.n_embd))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C) at positions (B or 1, T); with a cache, attends over the cached keys and values as well."""
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.heads(x)  # (B, T, H, hs), (B, T, KV, hs) twice
        cos, sin = rope_angles(positions, hs, self.rope_theta, self.rope_scaling)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = unit(q) * (self.s_qk() ** 2).view(self.n_head, hs).to(q.dtype)  # (B, T, H, hs)
        k = unit(k)  # (B, T, KV, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, S, KV, hs) each
        y = causal_attention(q, k, v, self.backend, 0.0, mask, scale=math.sqrt(hs), causal=self.causal)
        return self.c_proj(y.reshape(B, T, self.n_head * hs))  # (B, T, C)


class NormalizedMLP(FeedForward):
    """u * act(nu) with u = s_u ⊙ (W_u h) and nu = s_nu ⊙ (W_nu h) * sqrt(n_embd), then W_o; one fused [nu | u]
    projection of 2 * up_dim as in the dense MLP."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.act, _ = activation(block.non_linearity)  # gated: validated
        self.c_fc = nn.Linear(config.n_embd, 2 * block.up_dim, bias=False)
        self.c_proj = nn.Linear(block.up_dim, config.n_embd, bias=False)
        self.s_u = Scaling(block.up_dim, S_UV_INIT, S_UV_SCALE)
        self.s_nu = Scaling(block.up_dim, S_UV_INIT, S_UV_SCALE)
        self.nu_gain = math.sqrt(config.n_embd)

    def forward(self, x: torch.Tensor) -> FFNOutput:
        nu, u = self.c_fc(x).chunk(2, dim=-1)  # (B, T, up_dim) each
        h = self.act(nu * (self.s_nu() * self.nu_gain).to(nu.dtype)) * (u * self.s_u().to(u.dtype))  # (B, T, up_dim)
        return self.no_aux(self.c_proj(h))  # (B, T, C)


class NormalizedBlock(nn.Module):
    """h <- Norm(h + alpha_A (Norm(Attn(h)) - h)), then h <- Norm(h + alpha_M (Norm(MLP(h)) - h)), h on the unit
    sphere; alpha_A and alpha_M are per-channel scalings."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.attn = NormalizedAttention(block, config)
        self.ffn = NormalizedMLP(block, config)
        scale = config.ngpt_alpha_scale or 1 / math.sqrt(config.n_embd)
        self.alpha_attn = Scaling(config.n_embd, config.ngpt_alpha_attn_init, scale)
        self.alpha_mlp = Scaling(config.n_embd, config.ngpt_alpha_mlp_init, scale)
        self.mixing = full_attention_flops(block, config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, T, C) of unit rows at positions (B or 1, T); mask and cache as in the mixers. Returns the new hidden
        state (B, T, C), unit rows, and the MLP's (zero) auxiliary loss and (empty) stats."""
        h_attn = unit(self.attn(x, positions, mask, cache))  # (B, T, C)
        x = unit(x + self.alpha_attn().to(x.dtype) * (h_attn - x))  # (B, T, C)
        ffn = self.ffn(x)
        h_mlp = unit(ffn.out)  # (B, T, C)
        x = unit(x + self.alpha_mlp().to(x.dtype) * (h_mlp - x))  # (B, T, C)
        return x, ffn.aux_loss, ffn.stats

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The layer's generation cache: its attention's (unit keys and values)."""
        return self.attn.new_cache(batch, max_len, dtype, device)

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
        """No per-layer figures."""
        return {}

    def skipped_params(self, T: int) -> float:
        """Every token goes through the block: 0."""
        return 0.0

    def mixing_flops(self) -> float:
        """Its attention's mixing FLOPs per token (MixerKind.mixing_flops of mha/mqa/gqa)."""
        return self.mixing


class LogitScale(nn.Module):
    """s_z, one scaling per (padded) vocabulary entry: logits = s_z ⊙ (E_out h), stored at 1/sqrt(n_embd)."""

    def __init__(self, vocab: int, config: LLMconfig):
        super().__init__()
        self.s_z = Scaling(vocab, S_Z_INIT, 1 / math.sqrt(config.n_embd))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The output head's rows (V, C) each times its s_z, so that hidden @ result.T are the scaled logits."""
        return weight * self.s_z()[:, None].to(weight.dtype)  # (V, C)


def sphere_weights(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(weight, dim) of every matrix of an nGPT model, dim being the one along the model width that its vectors
    are normalised over: the embedding and output head rows, and per block the input projections' rows (W_q,
    W_k, W_v, W_u, W_nu: (out, n_embd), dim 1) and the output projections' columns (W_o of attention and MLP:
    (n_embd, in), dim 0). A tied head is listed once."""
    pairs = [(model.tok_emb.weight, 1)]
    if model.lm_head.weight is not model.tok_emb.weight:
        pairs.append((model.lm_head.weight, 1))
    for block in model.blocks:
        pairs += [(block.attn.c_attn.weight, 1), (block.attn.c_proj.weight, 0),
                  (block.ffn.c_fc.weight, 1), (block.ffn.c_proj.weight, 0)]
    return pairs


@torch.no_grad()
def normalize_weights(model: nn.Module, keep_within: float | None = None) -> None:
    """Puts every matrix's vectors along the model width back on the unit sphere (see sphere_weights); with
    `keep_within`, vectors whose norm is already within that of 1 are left exactly as they are."""
    for weight, dim in sphere_weights(model):
        norms = weight.norm(dim=dim, keepdim=True)  # (1, in) or (out, 1)
        normalized = unit(weight, dim)
        if keep_within is not None:
            normalized = torch.where((norms - 1).abs() <= keep_within, weight, normalized)
        weight.copy_(normalized)


def normalize_after_load(model: nn.Module, incompatible_keys) -> None:
    """A load_state_dict post-hook: weights read from a checkpoint are put back on the unit sphere. Vectors already
    unit up to float rounding are kept bit for bit (normalising them again could move their last bits), so a
    resumed run continues exactly as the uninterrupted one."""
    normalize_weights(model, keep_within=LOAD_TOLERANCE)


def validate(m: LLMconfig) -> None:
    """The model-wide checks: RoPE, no biases, dropout, norm flags, MTP; the alpha fields positive."""
    require(m.pos_emb == "rope", f"arch=ngpt keeps hidden states on the unit sphere and adds no position vectors, "
                                 f"but pos_emb={m.pos_emb}; use --pos_emb rope")
    require(not m.bias, "arch=ngpt has no biases but bias=True; drop --bias")
    require(m.dropout == 0, f"arch=ngpt has no dropout but dropout={m.dropout}; set --dropout 0")
    require(m.norm == "layer", f"arch=ngpt has no norm layers, so norm={m.norm} would be ignored; drop --norm")
    require(m.emb_init_std == LLMconfig.emb_init_std,
            f"arch=ngpt puts the embedding rows on the unit sphere, so emb_init_std={m.emb_init_std} would be "
            "ignored; drop --emb_init_std")
    require(m.mtp == "none", f"arch=ngpt with mtp={m.mtp} is not supported; use --mtp none or --arch gpt")
    for name in ("ngpt_alpha_attn_init", "ngpt_alpha_mlp_init"):
        require(getattr(m, name) > 0, f"{name}={getattr(m, name)} must be > 0")
    require(m.ngpt_alpha_scale is None or m.ngpt_alpha_scale > 0,
            f"ngpt_alpha_scale={m.ngpt_alpha_scale} must be > 0 (or unset: 1/sqrt(n_embd))")


def validate_block(b: BlockConfig, m: LLMconfig) -> None:
    """One layer of an nGPT model: mha/mqa/gqa attention without a window or routing, a dense gated MLP."""
    require(b.attn in ATTN_KINDS, f"arch=ngpt normalises mha/mqa/gqa attention, not attn={b.attn}; use --attn "
                                  "mha, mqa or gqa")
    require(b.window is None, f"arch=ngpt with a sliding window (window={b.window}) is not supported; drop --window")
    require(not b.mod, "arch=ngpt with mod=true (mixture-of-depths) is not supported; drop --mod")
    require(b.ffn == "dense", f"arch=ngpt has a dense MLP, not ffn={b.ffn}; use --ffn dense")
    require(activation(b.non_linearity)[1], f"arch=ngpt's MLP is gated (SwiGLU in the paper), but "
                                            f"non_linearity={b.non_linearity}; use --non_linearity swiglu (or geglu, "
                                            "reglu, glu)")


def validate_run(t: Trainconfig, m: LLMconfig) -> None:
    """What an nGPT run refuses: weight decay (the weights stay on the sphere), FSDP (normalising over sharded
    dimensions is not implemented) and float8."""
    require(t.weight_decay == 0, f"arch=ngpt keeps its weights on the unit sphere, so weight_decay={t.weight_decay} "
                                 "must be 0; pass --weight_decay 0 (--preset ngpt does)")
    require(t.dist != "fsdp", "arch=ngpt renormalises weights across the dimension FSDP shards; use --dist ddp")
    require(not t.fp8, "arch=ngpt with fp8 is not supported; drop --fp8")


class NormalizedLLM(LLM):
    """The nGPT model: normalized blocks, no final norm, logits scaled by s_z; its weights start on the unit sphere
    and return to it after every optimizer step and every load."""

    arch = "ngpt"

    def build_blocks(self) -> nn.ModuleList:
        return nn.ModuleList(NormalizedBlock(block, self.config) for block in self.config.layers)

    def build_final_norm(self) -> nn.Module:
        return nn.Identity()

    def add_modules(self) -> None:
        self.logit_scale = LogitScale(self.lm_head.weight.shape[0], self.config)

    def after_init(self) -> None:
        normalize_weights(self)
        self.register_load_state_dict_post_hook(normalize_after_load)

    def head_weight(self) -> torch.Tensor:
        """The output head's weight (V_padded, C), each row times its logit scale s_z."""
        return self.logit_scale(self.lm_head.weight)

    def after_step(self, layer_stats: list[dict[str, torch.Tensor]]) -> None:
        super().after_step(layer_stats)
        normalize_weights(self)


NGPT = ArchKind("ngpt", NormalizedLLM, validate, validate_block, validate_run, fields=ALPHA_FIELDS,
                export_refusal="arch=ngpt (the normalized transformer); no transformers family represents it")
