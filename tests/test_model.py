"""Model variants: shapes, loss at init, gradients, causality and closed-form parameter counts."""
import math
from typing import get_args

import pytest
import torch

from llm.config import ACTIVATION_ALIASES, PRESETS, LLMconfig, resolve_block
from llm.config.schema import Activation
from llm.model import build_model, padded_vocab_size
from llm.model.ffn.activations import GATED, PLAIN, activation
from tests.conftest import make_config

ATTENTION_SPECS = {
    "mha": dict(attn="mha", n_head=4),
    "mqa": dict(attn="mqa", n_head=4),
    "gqa": dict(attn="gqa", n_head=6, n_kv_heads=2),
    "mla": dict(attn="mla", n_head=4, q_latent_dim=24, kv_latent_dim=16, rope_head_dim=8),
    "mla_no_q_latent": dict(attn="mla", n_head=4, kv_latent_dim=16, rope_head_dim=4),
    "mla_head_dims": dict(attn="mla", n_head=4, q_latent_dim=24, kv_latent_dim=16, rope_head_dim=8,
                          qk_nope_head_dim=16, v_head_dim=8, rope_interleave=True),
    "gqa_qkv_bias_qk_norm": dict(attn="gqa", n_head=6, n_kv_heads=2, qkv_bias=True, qk_norm=True),
}
POSITIONS = ["learn", "sin", "rope"]
NORMS = ["layer", "rms"]


def attention_params(spec: dict, C: int, bias: bool, rope: bool) -> int:
    """Closed form of one attention layer's parameters."""
    H = spec["n_head"]
    hs = C // H
    if spec["attn"] != "mla":
        kv = {"mha": H, "mqa": 1, "gqa": spec.get("n_kv_heads")}[spec["attn"]]
        qkv_bias = bias or spec.get("qkv_bias", False)
        norms = 2 * hs if spec.get("qk_norm") else 0
        return C * (H + 2 * kv) * hs + qkv_bias * (H + 2 * kv) * hs + norms + H * hs * C + bias * C
    dn, dv = spec.get("qk_nope_head_dim") or hs, spec.get("v_head_dim") or hs
    dr = spec["rope_head_dim"] if rope else 0
    dq, dc = spec.get("q_latent_dim") or 0, spec["kv_latent_dim"]
    q = (C * dq + bias * dq + dq + dq * H * (dn + dr)) if dq else C * H * (dn + dr)
    kv = C * (dc + dr) + bias * (dc + dr) + dc + dc * H * (dn + dv)
    return q + kv + H * dv * C + bias * C


def mlp_params(C: int, up: int, gated: bool, bias: bool) -> int:
    """Closed form of one dense MLP's parameters."""
    first = (2 if gated else 1) * up
    return C * first + bias * first + up * C + bias * C


def model_params(config: LLMconfig) -> tuple[int, int]:
    """Closed form of the whole model's (total, active) parameters (padded vocabulary rows included, tied weights
    once); a token uses n_act - n_shared of the n_exp - n_shared routed experts of an MoE layer."""
    C, V = config.n_embd, padded_vocab_size(config.vocab_size)
    norm = C + (C if config.norm == "layer" and config.bias else 0)
    total = V * C * (1 if config.tie_embeddings else 2) + norm
    total += config.block_size * C if config.pos_emb == "learn" else 0
    inactive = 0
    for b in config.layers:
        spec = {k: getattr(b, k) for k in ("attn", "n_head", "n_kv_heads", "q_latent_dim", "kv_latent_dim", "rope_head_dim",
                                           "qk_nope_head_dim", "v_head_dim", "qkv_bias", "qk_norm")}
        gated = activation(b.non_linearity)[1]
        total += 2 * norm + attention_params(spec, C, config.bias, config.pos_emb == "rope")
        if b.ffn == "dense":
            total += mlp_params(C, b.up_dim, gated, config.bias)
            continue
        routed, expert = b.n_exp - b.n_shared, mlp_params(C, b.up_dim, gated, config.bias)
        shared = mlp_params(C, b.n_shared * b.up_dim, gated, config.bias) if b.n_shared else 0
        total += C * routed + routed * expert + shared
        inactive += (routed - (b.n_act - b.n_shared)) * expert
    return total, total - inactive


def variants() -> list:
    params = []
    for name, spec in ATTENTION_SPECS.items():
        for pos in POSITIONS:
            for norm in NORMS:
                params.append(pytest.param(spec, pos, norm, id=f"{name}-{pos}-{norm}"))
    return params


def check_model(config: LLMconfig) -> None:
    """Shapes, loss at init, gradient flow, causality and parameter count of one configuration."""
    model = build_model(config)
    B, T, V = 3, config.block_size, config.vocab_size
    idx = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    loss = model(idx, targets).loss  # with targets the loss comes without logits (chunked cross-entropy)
    assert model(idx).logits.shape == (B, T, V)
    assert abs(loss.item() - math.log(V)) < 0.25, f"loss at init {loss.item():.3f} vs ln(V)={math.log(V):.3f}"

    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"

    model.eval()
    t = T // 2
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    with torch.no_grad():
        before = model(idx).logits
        after = model(changed).logits
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t] - before[:, t]).abs().max() > 1e-4, "changing token t must change the logits at t"

    assert model.get_num_params() == model_params(config)


@pytest.mark.parametrize("spec,pos,norm", variants())
def test_attention_variants(spec, pos, norm):
    check_model(make_config(spec, pos_emb=pos, norm=norm))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_bias_and_tying(bias, tie):
    check_model(make_config(ATTENTION_SPECS["mla"], bias=bias, tie_embeddings=tie, pos_emb="rope", vocab_size=130))


@pytest.mark.parametrize("act", get_args(Activation))
def test_activations(act):
    check_model(make_config(dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity=act, up_dim=40), pos_emb="rope"))


def test_relu2_squares_the_relu():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(activation("relu2")[0](x), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0]))


def test_every_activation_name_has_one_function():
    assert set(get_args(Activation)) == set(PLAIN) | set(GATED) | set(ACTIVATION_ALIASES)
    assert not set(PLAIN) & set(GATED) and set(ACTIVATION_ALIASES.values()) <= set(PLAIN)


def test_gated_activations_are_gated():
    for act in GATED:
        model = build_model(make_config(dict(non_linearity=act, up_dim=40)))
        assert model.blocks[0].ffn.c_fc.out_features == 80


def test_heterogeneous_stack():
    layers = [ATTENTION_SPECS["mla"], ATTENTION_SPECS["gqa"], dict(attn="mqa", n_head=2, non_linearity="swiglu")]
    config = make_config(layers, pos_emb="rope", norm="rms")
    check_model(config)
    kinds = [type(b.attn).__name__ for b in build_model(config).blocks]
    assert kinds == ["MultiHeadLatentAttention", "GroupedQueryAttention", "GroupedQueryAttention"]


MOE_SPECS = {
    "softmax-switch": dict(ffn="moe", n_exp=6, n_shared=1, n_act=3, up_dim=32),
    "sigmoid-auxfree-swiglu": dict(ffn="moe", n_exp=5, n_shared=2, n_act=4, router_score="sigmoid", aux_free=True,
                                   non_linearity="swiglu", up_dim=24),
    "no-shared-top1": dict(ffn="moe", n_exp=4, n_shared=0, n_act=1, norm_topk=False, non_linearity="relu", up_dim=40),
}


@pytest.mark.parametrize("spec", MOE_SPECS.values(), ids=MOE_SPECS.keys())
@pytest.mark.parametrize("bias", [False, True])
def test_moe_variants(spec, bias):
    check_model(make_config(spec, bias=bias, n_embd=32))


def test_heterogeneous_stack_with_moe():
    layers = [{**ATTENTION_SPECS["mla"], **MOE_SPECS["sigmoid-auxfree-swiglu"]}, ATTENTION_SPECS["gqa"]]
    config = make_config(layers, pos_emb="rope", norm="rms")
    check_model(config)
    total, active = build_model(config).get_num_params()
    assert active < total


def test_vocab_is_padded_and_logits_sliced():
    model = build_model(make_config(vocab_size=97))
    assert model.tok_emb.weight.shape[0] == 128
    logits = model(torch.zeros(1, 4, dtype=torch.long)).logits
    assert logits.shape[-1] == 97


def test_sequence_longer_than_block_size_is_refused():
    model = build_model(make_config(block_size=8))
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_residual_projections_scaled_by_depth():
    config = make_config(n_layer=8, n_embd=256, layers=[dict(n_head=4)] * 8)
    model = build_model(config)
    std = model.blocks[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 1e-3
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3


def test_llama3_8b_preset_parameter_count_on_meta():
    model_cfg, block, _ = PRESETS["llama3-8b-genomic"]
    config = LLMconfig(**{**model_cfg.__dict__, "layers": [resolve_block(block, model_cfg.n_embd)] * model_cfg.n_layer})
    with torch.device("meta"):
        model = build_model(config)
    total, _ = model.get_num_params()
    C, L, F, kv = 4096, 32, 14336, 1024
    per_layer = 2 * C * C + 2 * C * kv + 3 * C * F + 2 * C
    assert (total, total) == (L * per_layer + 2 * 256 * C + C,) * 2 == model_params(config)
    assert 6.9e9 < total < 7.0e9  # Llama-3-8B's 8.03B includes 1.05B of 128256-token embeddings; here vocab is 256
