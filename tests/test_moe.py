"""Mixture-of-Experts: routing, dispatch, balance losses, aux-loss-free bias updates and their bookkeeping."""
import math

import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import read_checkpoint, save_checkpoint
from llm.config import ConfigError, Trainconfig, config_dict
from llm.model import LLM, build_model
from llm.model.ffn.activations import activation
from llm.model.ffn.experts import padded_bmm
from llm.model.ffn.moe import MoE, sequence_balance_loss, switch_balance_loss
from tests.conftest import make_config

C = 32


def moe_layer(**spec) -> MoE:
    config = make_config(dict(ffn="moe", **spec), n_embd=C, n_layer=1)
    return build_model(config).blocks[0].ffn


def brute_force_routing(logits: torch.Tensor, bias: torch.Tensor | None, score: str, k: int, norm_topk: bool):
    """Scores, chosen experts and gate weights, token by token with Python lists."""
    all_scores, all_indices, all_weights = [], [], []
    for row in logits.tolist():
        if score == "softmax":
            exps = [math.exp(v) for v in row]
            scores = [e / sum(exps) for e in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + (bias[i].item() if bias is not None else 0.0) for i, s in enumerate(scores)]
        chosen = sorted(range(len(row)), key=lambda i: -choice[i])[:k]
        weights = [scores[i] for i in chosen]
        if norm_topk:
            weights = [w / sum(weights) for w in weights]
        all_scores.append(scores), all_indices.append(chosen), all_weights.append(weights)
    return torch.tensor(all_scores), torch.tensor(all_indices), torch.tensor(all_weights)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("aux_free", [False, True])
def test_routing_equals_brute_force(score, norm_topk, aux_free):
    moe = moe_layer(n_exp=7, n_shared=1, n_act=4, router_score=score, norm_topk=norm_topk, aux_free=aux_free)
    if aux_free:
        moe.router.expert_bias.copy_(torch.randn(6) * 0.1)
    x = torch.randn(50, C)
    route = moe.router(x)
    logits = (x.double() @ moe.router.gate.weight.double().T)
    scores, indices, weights = brute_force_routing(logits, moe.router.expert_bias, score, 3, norm_topk)
    torch.testing.assert_close(route.scores, scores.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(route.indices, indices)
    torch.testing.assert_close(route.weights, weights.float(), rtol=1e-5, atol=1e-6)


def test_bias_steers_selection_but_not_gate_weights():
    moe = moe_layer(n_exp=5, n_shared=1, n_act=3, aux_free=True, norm_topk=False)
    x = torch.randn(20, C)
    moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 always chosen
    route = moe.router(x)
    assert (route.indices == 3).any(dim=-1).all()
    torch.testing.assert_close(route.weights, route.scores.gather(1, route.indices))


def naive_moe(moe: MoE, x: torch.Tensor, non_linearity: str) -> torch.Tensor:
    """The layer's output token by token: shared MLP plus the gate-weighted chosen experts, with plain matmuls."""
    act, gated = activation(non_linearity)
    fc, proj = moe.experts.c_fc, moe.experts.c_proj

    def mlp(v, w1, b1, w2, b2):
        h = v @ w1.T + (b1 if b1 is not None else 0)
        if gated:
            gate, up = h.chunk(2)
            h = act(gate) * up
        else:
            h = act(h)
        return h @ w2.T + (b2 if b2 is not None else 0)

    route = moe.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(route.indices[t].tolist(), route.weights[t]):
            out[t] += w * mlp(x[t], fc.weight[e], fc.bias[e] if fc.bias is not None else None,
                              proj.weight[e], proj.bias[e] if proj.bias is not None else None)
        if moe.shared is not None:
            s = moe.shared
            out[t] += mlp(x[t], s.c_fc.weight, s.c_fc.bias, s.c_proj.weight, s.c_proj.bias)
    return out


MOE_SHAPES = [
    dict(n_exp=8, n_shared=1, n_act=3, non_linearity="gelu", up_dim=24),
    dict(n_exp=6, n_shared=2, n_act=4, non_linearity="swiglu", router_score="sigmoid", aux_free=True, up_dim=24),
    dict(n_exp=4, n_shared=0, n_act=2, non_linearity="relu", norm_topk=False, up_dim=22),  # unaligned: padded bmm
]


@pytest.mark.parametrize("spec", MOE_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_layer_equals_per_token_loop(spec, bias):
    config = make_config(dict(ffn="moe", **spec), n_embd=C, n_layer=1, bias=bias)
    moe = build_model(config).blocks[0].ffn
    for name, p in moe.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 9, C)
    y, _, stats = moe(x)
    expected = naive_moe(moe, x.view(-1, C), spec["non_linearity"]).view_as(y)
    assert (y - expected).abs().max().item() <= 1e-5
    k = spec["n_act"] - spec["n_shared"]
    assert stats["load"].sum().item() == 18 * k

    y.square().sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    chosen = torch.zeros(moe.router.n_routed, dtype=torch.bool)
    chosen[moe.router(x.view(-1, C)).indices.unique()] = True
    for expert_linear in (moe.experts.c_fc, moe.experts.c_proj):
        per_expert = expert_linear.weight.grad.flatten(1).abs().sum(dim=1)
        assert (per_expert[chosen] > 0).all() and (per_expert[~chosen] == 0).all()


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1]])
def test_padded_fallback_equals_grouped_mm(counts):
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, w = torch.randn(sum(counts), 8, requires_grad=True), torch.randn(4, 8, 4, requires_grad=True)
    expected = F.grouped_mm(x, w, offs=offsets)
    got = padded_bmm(x, w, offsets)
    torch.testing.assert_close(got, expected)
    starts = [0] + offsets.tolist()[:-1]
    per_group = torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, offsets.tolist()))])
    torch.testing.assert_close(got, per_group)
    grad = torch.randn_like(got)
    (gx_fallback, gw_fallback) = torch.autograd.grad(got, (x, w), grad)
    (gx, gw) = torch.autograd.grad(expected, (x, w), grad)
    torch.testing.assert_close(gx_fallback, gx), torch.testing.assert_close(gw_fallback, gw)


def test_float64_layer_uses_the_fallback_and_matches_the_loop():
    moe = moe_layer(n_exp=5, n_shared=1, n_act=3, up_dim=16).double()
    x = torch.randn(11, C, dtype=torch.float64)
    y = moe(x.view(1, 11, C)).out
    torch.testing.assert_close(y.view(11, C), naive_moe(moe, x, "gelu"), rtol=1e-9, atol=1e-9)


def test_compiled_bf16_grouped_path_matches_eager():
    moe = moe_layer(n_exp=6, n_shared=1, n_act=3, up_dim=32)
    x = torch.randn(2, 8, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = moe(x).out
        compiled = torch.compile(moe)(x).out
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(eager.float(), moe(x).out, rtol=5e-2, atol=5e-2)


def test_balance_losses_equal_their_definitions():
    E, k, B, T = 5, 2, 3, 6
    scores = torch.rand(B * T, E)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(B * T)])
    f = torch.tensor([(indices == i).sum().item() / (B * T * k) for i in range(E)])
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    load = torch.bincount(indices.flatten(), minlength=E)
    torch.testing.assert_close(switch_balance_loss(scores, load), E * (f * P).sum())
    per_sequence = []
    for b in range(B):
        s, idx = scores[b * T:(b + 1) * T], indices[b * T:(b + 1) * T]
        f = torch.tensor([E / (k * T) * (idx == i).sum().item() for i in range(E)])
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        per_sequence.append((f * P).sum())
    torch.testing.assert_close(sequence_balance_loss(scores, indices, B), torch.stack(per_sequence).mean())


def test_uniform_routing_gives_balance_loss_one():
    E = 4
    indices = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert chosen equally often, top-2
    scores = torch.full((8, E), 1 / E)
    assert switch_balance_loss(scores, torch.bincount(indices.flatten(), minlength=E)).item() == pytest.approx(1.0)
    assert sequence_balance_loss(scores, indices, 2).item() == pytest.approx(1.0)


def test_balance_loss_is_weighted_by_coeff_or_alpha():
    x = torch.randn(2, 5, C)
    for spec, weight in ((dict(coeff=0.5), 0.5), (dict(aux_free=True, alpha=0.25), 0.25)):
        moe = moe_layer(n_exp=6, n_shared=1, n_act=3, **spec)
        route = moe.router(x.view(-1, C))
        raw = sequence_balance_loss(route.scores, route.indices, 2) if "aux_free" in spec else \
            switch_balance_loss(route.scores, torch.bincount(route.indices.flatten(), minlength=5))
        torch.testing.assert_close(moe(x).aux_loss, weight * raw)


def test_router_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits():
    """ST-MoE's z-loss, token by token, joins the balance loss weighted by router_z_loss (0: left out)."""
    x = torch.randn(2, 5, C)
    plain, with_z = moe_layer(n_exp=6, n_shared=1, n_act=3), moe_layer(n_exp=6, n_shared=1, n_act=3, router_z_loss=0.1)
    with_z.load_state_dict(plain.state_dict())
    logits = (x.view(-1, C) @ plain.router.gate.weight.T).tolist()  # (10, 5)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)
    assert (with_z(x).aux_loss - plain(x).aux_loss).item() == pytest.approx(0.1 * z, rel=1e-5)
    assert plain.router(x.view(-1, C)).z_loss.item() == 0.0


def max_mean(load: torch.Tensor) -> float:
    return (load.max() / load.float().mean()).item()


def test_aux_free_bias_updates_balance_a_skewed_router():
    moe = moe_layer(n_exp=9, n_shared=1, n_act=3, router_score="sigmoid", aux_free=True, gamma=0.001)
    with torch.no_grad():
        moe.router.gate.weight.normal_(std=0.2)  # a router with spread-out scores, as after some training
        moe.router.gate.weight[:2] += 0.3  # experts 0 and 1 are preferred by most tokens
    batch = lambda tokens: torch.randn(16, tokens, C) + 0.5  # noqa: E731
    first = moe(batch(256)).stats["load"]
    assert max_mean(first) > 3
    for _ in range(1000):  # one update per optimizer step, each on a fresh batch
        moe.after_step(moe(batch(64)).stats)
    last = moe(batch(256)).stats["load"]
    print(f"aux-free balancing: max/mean load {max_mean(first):.2f} -> {max_mean(last):.2f} after 1000 updates")
    assert max_mean(last) < 1.2


def test_bias_moves_by_gamma_towards_balance():
    moe = moe_layer(n_exp=5, n_shared=1, n_act=3, aux_free=True, gamma=0.1)
    moe.after_step({"load": torch.tensor([10, 2, 4, 4])})
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    moe_no_bias = moe_layer(n_exp=5, n_shared=1, n_act=3, aux_free=False)
    moe_no_bias.after_step({"load": torch.tensor([10, 2, 4, 4])})
    assert moe_no_bias.router.expert_bias is None


def moe_model(**overrides) -> LLM:
    layers = [dict(ffn="moe", n_exp=6, n_shared=1, n_act=3, aux_free=True, gamma=0.05, **overrides), dict()]
    return build_model(make_config(layers, n_embd=C))


def test_recomputation_counts_loads_once_and_gives_identical_gradients():
    torch.manual_seed(0)
    plain = moe_model()
    recomputed = moe_model()
    recomputed.load_state_dict(plain.state_dict())
    recomputed.act_recomp = True
    idx = torch.randint(0, 97, (3, 16))
    outs = []
    for model in (plain, recomputed):
        out = model(idx, idx)
        (out.loss + out.aux_loss).backward()
        model.after_step(out.layer_stats)
        outs.append(out)
    assert outs[1].layer_stats[0]["load"].sum().item() == 3 * 16 * 2 and outs[1].layer_stats[1] == {}
    assert torch.equal(outs[0].layer_stats[0]["load"], outs[1].layer_stats[0]["load"])
    assert torch.equal(plain.blocks[0].ffn.router.expert_bias, recomputed.blocks[0].ffn.router.expert_bias)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_forward_and_eval_leave_the_bias_unchanged():
    model = moe_model()
    before = model.blocks[0].ffn.router.expert_bias.clone()
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx)
    model.eval()
    with torch.no_grad():
        model(idx, idx)
    assert torch.equal(model.blocks[0].ffn.router.expert_bias, before)


def test_bias_round_trips_through_a_checkpoint(tmp_path):
    model = moe_model()
    model.blocks[0].ffn.router.expert_bias.copy_(torch.randn(5))
    config = config_dict(model.config, Trainconfig())
    state = {"step": 1, "optimizer": {}, "scaler": None, "rng": {}, "loaders": {}, "best_val_loss": 1.0}
    path = save_checkpoint(tmp_path, 1, model.state_dict(), state, config, {"tokenizer": "byte"}, "m",
                           keep_last=1, interval=1)
    fresh = moe_model()
    weights, read_state, _ = read_checkpoint(path, config, 1)
    fresh.load_state_dict(weights)
    assert read_state == state and fresh.lm_head.weight is fresh.tok_emb.weight
    assert torch.equal(fresh.blocks[0].ffn.router.expert_bias, model.blocks[0].ffn.router.expert_bias)


def test_compiled_model_sees_bias_updates():
    model = moe_model().eval()
    compiled = torch.compile(model)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        compiled(idx)
        model.blocks[0].ffn.router.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0, 0.0]))
        got = compiled(idx)
        expected = model(idx)
    assert torch.equal(got.layer_stats[0]["load"][2:], torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(got.logits, expected.logits)


def test_without_torch_grouped_mm_the_padded_path_gives_the_same_layer(monkeypatch):
    from llm.model.ffn import experts

    moe = moe_layer(n_exp=5, n_shared=1, n_act=3, up_dim=16)
    x = torch.randn(1, 11, C)
    grouped = moe(x).out
    monkeypatch.setattr(experts, "GROUPED_MM", None)
    padded = moe(x).out
    torch.testing.assert_close(padded, grouped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded.view(11, C), naive_moe(moe, x.view(11, C), "gelu"), rtol=1e-5, atol=1e-5)


def test_mixtral_gate_is_a_softmax_over_the_top_k_logits():
    """Mixtral: the k largest logits are chosen and weighed by a softmax over those k alone; the balancing scores are
    the softmax over all experts. Independent of norm_topk."""
    from llm.model.ffn.router import Router

    for norm_topk in (True, False):
        config = make_config(dict(ffn="moe", n_exp=6, n_shared=0, n_act=3, router_score="mixtral",
                                  norm_topk=norm_topk, up_dim=16))
        router = Router(config.layers[0], config)
        x = torch.randn(10, config.n_embd)
        route = router(x)
        logits = x @ router.gate.weight.T  # (N, E)
        top = logits.topk(3, dim=-1)
        assert torch.equal(route.indices, top.indices)
        expected = torch.exp(top.values) / torch.exp(top.values).sum(dim=-1, keepdim=True)
        torch.testing.assert_close(route.weights, expected)
        torch.testing.assert_close(route.scores, logits.softmax(dim=-1))


def test_jitter_noise_scales_router_inputs_in_training_only():
    from llm.model.ffn.router import Router

    config = make_config(dict(ffn="moe", n_exp=4, n_shared=0, n_act=2, jitter_noise=0.2, up_dim=16))
    router = Router(config.layers[0], config)
    x = torch.randn(64, config.n_embd)
    router.eval()
    torch.testing.assert_close(router(x).scores, (x @ router.gate.weight.T).softmax(-1))
    router.train()
    torch.manual_seed(3)
    noisy = router(x).scores
    torch.manual_seed(3)
    factor = torch.empty_like(x).uniform_(0.8, 1.2)  # the draw the router makes
    torch.testing.assert_close(noisy, ((x * factor) @ router.gate.weight.T).softmax(-1))
    assert not torch.allclose(noisy, router(x).scores)  # a fresh draw each call
    assert 0.8 <= factor.min() and factor.max() <= 1.2


@pytest.mark.parametrize("fields,message", [
    (dict(jitter_noise=1.0), "jitter_noise=1.0 must be in"), (dict(jitter_noise=-0.1), "jitter_noise=-0.1"),
    (dict(router_z_loss=-1e-3), "router_z_loss=-0.001 must be >= 0"),
    (dict(router_score="mixtral", n_act=2, n_shared=1), "router_score=mixtral with n_act - n_shared = 1"),
])
def test_gating_variants_refuse_bad_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        make_config(dict(ffn="moe", n_exp=4, **{"n_shared": 0, "n_act": 2, **fields}, up_dim=16))
