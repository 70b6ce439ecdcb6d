"""DeepSeek-V3's full MLA and router, and the Qwen2, Qwen3 and Mistral families: slow references of the new layer
features, greedy generation against transformers, the family each model exports as, and the refusals."""
import math
from dataclasses import replace

import pytest
import torch
import transformers

from llm.cli import parse
from llm.config import ConfigError
from llm.generate import generate
from llm.hf import config_from_hf, family, to_hf
from llm.model import LLM, build_model
from llm.model.ffn.moe import MoE
from llm.model.ffn.router import Router
from llm.model.mixers.mla import MultiHeadLatentAttention
from tests.conftest import make_config
from tests.test_hf import DEEPSEEK_V3_DENSE, FAMILIES, GQA, logit_difference, with_random_biases

NEW_FAMILIES = ["deepseek-v3-real-head-dims-groups", "qwen2-qkv-bias-window", "qwen2-untied-no-window",
                "qwen3-qk-norm-untied", "qwen3-wide-heads", "llama-narrow-heads", "mistral-window",
                "mistral-window-wide-heads"]


def reference_routing(scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int,
                      scaling: float) -> tuple[list[set[int]], torch.Tensor]:
    """DeepSeek-V3's group-limited choice token by token: rank groups by the sum of their two best biased scores,
    keep the topk_group best groups, take the k best biased scores among their experts; gate weights are the
    unbiased scores of those experts normalised to sum to 1, times the scaling factor."""
    N, E = scores.shape
    size = E // n_group
    chosen, weights = [], torch.zeros(N, E)
    for n in range(N):
        biased = [scores[n, e].item() + bias[e].item() for e in range(E)]
        group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        experts = set(sorted(allowed, key=lambda e: -biased[e])[:k])
        total = sum(scores[n, e].item() for e in experts)
        for e in experts:
            weights[n, e] = scaling * scores[n, e].item() / total
        chosen.append(experts)
    return chosen, weights


def test_group_limited_router_matches_a_token_by_token_reference():
    config = make_config(dict(ffn="moe", n_exp=17, n_shared=1, n_act=5, router_score="sigmoid", aux_free=True,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5, non_linearity="swiglu", up_dim=16))
    router = Router(config.layers[0], config)
    router.gate.weight.data.normal_(std=0.5)
    router.expert_bias.normal_(std=0.2)
    x = torch.randn(64, config.n_embd)
    route = router(x)
    scores = torch.sigmoid(x @ router.gate.weight.T)  # (N, E)
    chosen, expected = reference_routing(scores, router.expert_bias, 4, 2, 4, 2.5)
    assert [set(row.tolist()) for row in route.indices] == chosen
    got = torch.zeros(64, 16).scatter(1, route.indices, route.weights)  # (N, E)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    unlimited = Router(replace(config.layers[0], topk_group=4), config)
    unlimited.load_state_dict(router.state_dict())
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(unlimited(x).indices, route.indices))


def rotate_pairs(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE by the definition (Su et al. 2021) on x (T, d): dimensions 2i and 2i+1 rotated by position *
    theta^(-2i/d)."""
    out = x.clone()
    d = x.shape[-1]
    for t in range(x.shape[0]):
        for i in range(d // 2):
            angle = positions[t].item() * theta ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            out[t, 2 * i] = x[t, 2 * i] * c - x[t, 2 * i + 1] * s
            out[t, 2 * i + 1] = x[t, 2 * i] * s + x[t, 2 * i + 1] * c
    return out


def reference_mla(mla: MultiHeadLatentAttention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """MLA (DeepSeek-V2 section 2.1) of one sequence x (T, C) head by head, with interleaved RoPE pairs: per head
    query [nope dn | rope dr], key [nope dn from the latent | the shared rope key], value dv from the latent,
    scores over sqrt(dn + dr), causal softmax."""
    T = x.shape[0]
    H, dn, dv, dr, dc = mla.n_head, mla.nope_dim, mla.v_dim, mla.rope_dim, mla.kv_latent_dim
    positions = torch.arange(T)
    q = mla.q_proj(x).view(T, H, dn + dr)
    down = mla.kv_down(x)
    latent = mla.kv_norm(down[:, :dc])  # (T, dc)
    k_rope = rotate_pairs(down[:, dc:], positions, theta)  # (T, dr)
    kv = (latent @ mla.kv_up.weight.T).view(T, H, dn + dv)
    heads = []
    for h in range(H):
        q_rope = rotate_pairs(q[:, h, dn:], positions, theta)
        scores = (q[:, h, :dn] @ kv[:, h, :dn].T + q_rope @ k_rope.T) / math.sqrt(dn + dr)  # (T, T)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(dim=-1) @ kv[:, h, dn:])  # (T, dv)
    return mla.c_proj(torch.cat(heads, dim=-1))  # (T, C)


def test_mla_with_own_head_dims_and_interleaved_rope_matches_the_definition_with_and_without_a_cache():
    spec = dict(DEEPSEEK_V3_DENSE, n_head=2, q_latent_dim=24, kv_latent_dim=16, rope_head_dim=8,
                qk_nope_head_dim=12, v_head_dim=20)
    config = make_config(spec, n_embd=32, pos_emb="rope", norm="rms", rope_theta=100.0)
    mla = MultiHeadLatentAttention(config.layers[0], config).eval()
    assert (mla.nope_dim, mla.v_dim) == (12, 20) and mla.c_proj.in_features == 2 * 20
    x = torch.randn(1, 10, 32)
    positions = torch.arange(10)[None]
    with torch.no_grad():
        expected = reference_mla(mla, x[0], 100.0)
        torch.testing.assert_close(mla(x, positions)[0], expected, rtol=1e-5, atol=1e-5)
        cache = mla.new_cache(1, 10, torch.float32, torch.device("cpu"))
        steps = [mla(x[:, :4], positions[:, :4], cache=cache)] + [
            mla(x[:, t:t + 1], positions[:, t:t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1)[0], expected, rtol=1e-5, atol=1e-5)  # the absorbed form


def imported(name: str) -> tuple[LLM, torch.nn.Module]:
    """Our model of a family's test configuration and the transformers model exported from it."""
    config, _ = FAMILIES[name]
    ours = with_random_biases(build_model(config)).eval()
    return ours, to_hf(ours).eval()


def test_deepseek_parity_depends_on_group_routing_and_interleaving():
    """The parity tests would notice if either feature were dropped: without them the logits differ."""
    ours, theirs = imported("deepseek-v3-real-head-dims-groups")
    vocab = ours.config.vocab_size
    assert logit_difference(ours, theirs, vocab) <= 1e-5
    for module in ours.modules():
        if isinstance(module, MoE):
            module.router.topk_group = module.router.n_group
    assert logit_difference(ours, theirs, vocab) > 1e-4
    ours, theirs = imported("deepseek-v3-real-head-dims-groups")
    for module in ours.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.rope_interleave = False
    assert logit_difference(ours, theirs, vocab) > 1e-4


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_greedy_generation_equals_transformers(name):
    ours, theirs = imported(name)
    prompt = torch.randint(0, ours.config.vocab_size, (1, 5))
    mine = generate(ours, prompt.tolist(), max_new_tokens=20, temperature=0.0)[0]
    with torch.no_grad():
        out = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert mine == out[0, 5:].tolist()


@pytest.mark.parametrize("layers,model_type", [
    (GQA, "qwen2"),
    ([dict(GQA, window=4), GQA], "qwen2"),
    (dict(GQA, qkv_bias=False, qk_norm=True), "qwen3"),
    ([dict(GQA, qkv_bias=False, qk_norm=True, window=4), dict(GQA, qkv_bias=False, qk_norm=True)], "qwen3"),
    (dict(GQA, qkv_bias=False, window=4), "mistral"),
    ([dict(GQA, qkv_bias=False, window=4), dict(GQA, qkv_bias=False)], "qwen2"),
    (dict(GQA, qkv_bias=False), "llama"),
    (dict(GQA, qkv_bias=False, head_dim=16), "llama"),
    (dict(GQA, qkv_bias=False, qk_norm=True, head_dim=16), "qwen3"),
])
def test_each_model_exports_as_the_first_family_that_represents_it(layers, model_type):
    config = make_config(layers, pos_emb="rope", norm="rms")
    assert family(config) == model_type
    back = config_from_hf(to_hf(build_model(config)).config).layers[0]
    assert (back.window, back.head_dim) == (config.layers[0].window, config.layers[0].head_dim)


@pytest.mark.parametrize("layers,fields,message", [
    (dict(GQA, qk_norm=True), {}, "Qwen3's attention_bias biases the output projection too"),
    (dict(GQA, qk_norm=True, qkv_bias=False), dict(bias=True), "Qwen3 has no biases on the output projection"),
    ([dict(GQA, window=4), dict(GQA, window=6)], {}, "layers differ in window of the windowed layers"),
    (dict(GQA, window=4), dict(bias=True), "Mistral has no biases"),
    (dict(GQA, head_dim=16), {}, "Qwen2Config has no head_dim"),
])
def test_models_no_family_represents_are_refused_with_the_reason(layers, fields, message):
    config = make_config(layers, pos_emb="rope", norm="rms", **fields)
    with pytest.raises(ConfigError, match="^cannot export: .*" + message):
        to_hf(build_model(config))


def test_heads_that_do_not_divide_the_width_are_refused_for_export():
    """transformers' Llama-like configs refuse hidden_size % heads != 0 whatever head_dim says."""
    config = make_config(dict(GQA, qkv_bias=False, n_head=5, n_kv_heads=1, head_dim=14), pos_emb="rope", norm="rms")
    with pytest.raises(ConfigError, match="^cannot export: .*hidden_size to be a multiple of num_attention_heads"):
        to_hf(build_model(config))


def test_gpt2_refuses_heads_of_their_own_width():
    config = make_config(dict(attn="mha", n_head=4, head_dim=16, non_linearity="gelu"))
    with pytest.raises(ConfigError, match="^cannot export: .*GPT-2's heads are n_embd / n_head wide"):
        to_hf(build_model(config))


@pytest.mark.parametrize("hf_cfg,message", [
    (transformers.Qwen3Config(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                              attention_bias=True, num_hidden_layers=1, vocab_size=97), "attention_bias=True"),
    (transformers.MistralConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu",
                                num_hidden_layers=1, vocab_size=97), "hidden_act='gelu'"),
    (transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=97,
                                   rms_norm_eps=1e-6, rope_parameters=dict(rope_type="dynamic", factor=4.0,
                                                                           rope_theta=1e4)), "rope_type='dynamic'"),
])
def test_imports_of_what_we_cannot_represent_are_refused_with_the_field(hf_cfg, message):
    with pytest.raises(ConfigError, match="^cannot import .*" + message):
        config_from_hf(hf_cfg)


def test_scaled_rope_of_the_llama_like_families_maps_to_ours():
    hf_cfg = transformers.Qwen2Config(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=1, vocab_size=97,
                                      rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4))
    config = config_from_hf(hf_cfg)
    assert (config.rope_scaling, config.rope_factor, config.rope_theta) == ("linear", 2.0, 1e4)


@pytest.mark.parametrize("flags,message", [
    (["--n_group", "3"], "n_group=3 must be >= 1 and divide the 7 routed experts"),
    (["--n_group", "7", "--topk_group", "2"], "leaves fewer than 2 experts per group"),
    (["--n_group", "1", "--topk_group", "2"], r"topk_group=2 must be in \[1, n_group=1\]"),
    (["--n_exp", "9", "--n_act", "5", "--n_group", "4", "--topk_group", "1"], "hold fewer than the 4 routed"),
    (["--routed_scaling_factor", "0"], "routed_scaling_factor=0.0 must be > 0"),
])
def test_router_group_fields_are_checked(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(["--moe", "--router_score", "sigmoid", *flags])


def test_mla_head_dims_are_checked():
    with pytest.raises(ConfigError, match="qk_nope_head_dim=0 must be >= 1"):
        parse(["--attn", "mla", "--kv_latent_dim", "16", "--rope_head_dim", "8", "--pos_emb", "rope",
               "--qk_nope_head_dim", "0"])
