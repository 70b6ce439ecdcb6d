"""Mixture-of-depths (mod): the routed block against direct references in training and evaluation, causality of
evaluation and generation, gradients, parameter and FLOP counts, validation, and training end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import ConfigError
from llm.generate import generate, prefill, recompute
from llm.model import LLM, build_model
from llm.model.block import Block
from llm.model.mod import RoutedBlock, RoutedCache
from llm.train import train
from tests.conftest import make_config
from tests.test_model import model_params

ROPE = dict(pos_emb="rope", norm="rms")
MOD = dict(mod=True, capacity=0.25, mod_predictor_dim=16)
MOE = dict(ffn="moe", n_exp=5, n_shared=1, n_act=3, up_dim=32)


def routed_model(spec: dict | list | None = None, **fields) -> LLM:
    """A small model whose layers are routed (`spec` defaults to MOD on every layer), RoPE positions by default."""
    return build_model(make_config(MOD if spec is None else spec, **{**ROPE, **fields}))


def route_half(layer: RoutedBlock) -> None:
    """Spreads the predictor's logits around 0 (output weights x 50, bias 0): it then routes some tokens, not all."""
    with torch.no_grad():
        layer.predictor[2].weight.mul_(50)
        layer.predictor[2].bias.zero_()


def subset_reference(layer: RoutedBlock, x: torch.Tensor, positions: torch.Tensor,
                     chosen: list[list[int]]) -> torch.Tensor:
    """The paper's definition, one row at a time: the inner block runs on the chosen tokens alone (at their own
    positions); each of them becomes x + sigmoid(w . x) * (block(x) - x), every other token stays x."""
    out = x.clone()
    for b, rows in enumerate(chosen):
        if not rows:
            continue
        picked = x[b, rows][None]  # (1, k, C)
        y, _, _ = Block.forward(layer, picked, positions[b, rows][None])
        weight = torch.sigmoid(picked @ layer.router.weight.T)  # (1, k, 1)
        out[b, rows] = (picked + weight * (y - picked))[0]
    return out


def predicted_rows(layer: RoutedBlock, x: torch.Tensor) -> list[list[int]]:
    """Per row, the tokens whose predictor logit, computed from its weights by hand, is positive."""
    first, last = layer.predictor[0], layer.predictor[2]
    logits = F.gelu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias  # (B, T, 1)
    return [[t for t in range(x.size(1)) if logits[b, t, 0] > 0] for b in range(x.size(0))]


@pytest.mark.parametrize("ffn", [{}, MOE], ids=["dense", "moe"])
def test_training_applies_the_block_to_exactly_the_top_k_tokens(ffn):
    layer = routed_model({**MOD, **ffn}, n_layer=1).blocks[0].train()
    x, positions = torch.randn(3, 20, 48), torch.arange(20)[None].expand(3, 20)
    k = round(0.25 * 20)
    scores = (x @ layer.router.weight.T)[..., 0]  # (B, T)
    chosen = [sorted(sorted(range(20), key=lambda t: -scores[b, t].item())[:k]) for b in range(3)]
    got, _, stats = layer(x, torch.arange(20)[None])
    torch.testing.assert_close(got, subset_reference(layer, x, positions, chosen))
    if ffn:  # MoE counts the k chosen tokens of each row, each going to one routed expert
        assert stats["load"].sum().item() == 3 * k * (MOE["n_act"] - MOE["n_shared"])
    assert stats["mod_tokens"].item() == 60


@pytest.mark.parametrize("ffn", [{}, MOE], ids=["dense", "moe"])
def test_evaluation_equals_the_block_on_the_predicted_tokens_alone(ffn):
    layer = routed_model({**MOD, **ffn}, n_layer=1).blocks[0].eval()
    route_half(layer)
    x, positions = torch.randn(3, 20, 48), torch.arange(20)[None].expand(3, 20)
    chosen = predicted_rows(layer, x)
    assert 0 < sum(map(len, chosen)) < 60  # some tokens routed, some not
    with torch.no_grad():
        got, _, stats = layer(x, torch.arange(20)[None])
        torch.testing.assert_close(got, subset_reference(layer, x, positions, chosen))
    assert stats["mod_predicted"].item() == sum(map(len, chosen))


def test_evaluation_is_causal():
    model = routed_model(n_layer=3).eval()
    for block in model.blocks:
        route_half(block)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        base = model(idx).logits
        for t in (0, 5, 17, 23):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 97
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
            assert not torch.allclose(logits[:, t], base[:, t])


def record_decisions(model: LLM) -> list[list[torch.Tensor]]:
    """Hooks that record, per routed layer and call, the predictor's decisions (B, T) on the layer's input."""
    calls = [[] for _ in model.blocks]
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(
            lambda module, args, i=i: calls[i].append(module.predictor(args[0])[..., 0] > 0))
    return calls


def test_generation_never_changes_an_earlier_routing_decision():
    model = routed_model(n_layer=3).eval()
    for block in model.blocks:
        route_half(block)
    calls = record_decisions(model)
    tokens = generate(model, [[5, 17, 3, 9]], max_new_tokens=12, temperature=0)[0]
    full = [5, 17, 3, 9] + tokens[:-1]  # every token the model was fed
    decoded = [torch.cat(layer_calls, dim=1) for layer_calls in calls]  # (1, 15): prefill, then one per step
    for layer_calls in calls:
        layer_calls.clear()
    with torch.no_grad():
        for end in range(len(full), 0, -1):  # the whole sequence first, then ever shorter prefixes
            model(torch.tensor([full[:end]]))
    for i, layer_calls in enumerate(calls):
        whole = layer_calls[0]  # (1, 15)
        assert torch.equal(decoded[i], whole)  # decisions made token by token = those on the whole sequence
        assert 0 < whole.sum() < len(full)
        for prefix in layer_calls[1:]:  # appending tokens never changes a decision on a prefix
            assert torch.equal(prefix, whole[:, :prefix.size(1)])


def test_cached_generation_equals_the_full_forward_pass_with_left_padding():
    model = routed_model([MOD, {}, {**MOD, **MOE}], n_layer=3).eval()
    for block in model.blocks:
        if isinstance(block, RoutedBlock):
            route_half(block)
    contexts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1], [8, 2, 8, 1, 8]]
    with torch.no_grad():
        logits, cache = prefill(model, contexts)
        torch.testing.assert_close(logits, recompute(model, contexts))
        assert isinstance(cache.layers[0], RoutedCache) and not isinstance(cache.layers[1], RoutedCache)
        for step in range(4):
            new = [[(7 * step + i) % 97] for i in range(3)]
            contexts = [c + n for c, n in zip(contexts, new)]
            logits = model(torch.tensor(new), cache=cache).logits[:, -1]
            torch.testing.assert_close(logits, recompute(model, contexts), rtol=1e-4, atol=1e-5)
    plain = build_model(make_config([{}, {}, MOE], **ROPE))
    assert model.cache_bytes_per_token() == plain.cache_bytes_per_token() + 2  # one routed flag per routed layer


def test_gradients_reach_the_router_the_predictor_and_every_block_parameter():
    model = routed_model({**MOD, **MOE}, n_layer=2).train()
    idx = torch.randint(0, 97, (4, 32))
    out = model(idx, idx)
    (out.loss + out.aux_loss).backward()
    for i, block in enumerate(model.blocks):
        for name, param in block.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), (i, name)
            assert param.grad.abs().sum() > 0, (i, name)


def test_the_predictor_learns_only_from_its_own_loss_and_the_router_only_from_the_language_model():
    model = routed_model(n_layer=1).train()
    idx = torch.randint(0, 97, (2, 32))
    out = model(idx, idx)
    block = model.blocks[0]
    predictor = torch.autograd.grad(out.loss, list(block.predictor.parameters()), allow_unused=True)
    assert all(g is None for g in predictor)
    router = torch.autograd.grad(out.aux_loss, block.router.weight, allow_unused=True)
    assert router == (None,)  # the predictor reads the stop-gradient input; top-k is not differentiable


def test_parameter_counts_add_the_router_and_the_predictor():
    config = make_config([{**MOD, **MOE}, MOD, {}], **ROPE)
    C, H = config.n_embd, MOD["mod_predictor_dim"]
    total, active = model_params(config)
    extra = 2 * (C + C * H + H + H + 1)  # router (no bias) and predictor per routed layer
    assert build_model(config).get_num_params() == (total + extra, active + extra)


def test_skipped_parameters_and_flops_per_token():
    """A routed layer's block counts for the k / T of the tokens it processes, its attention (k keys for k
    queries) for (k / T)^2; the other layer and the router and predictor count in full."""
    config = make_config([{**MOD, **MOE}, {}], **ROPE, block_size=32)
    model = build_model(config)
    inner = Block(config.layers[0], config)
    block_active = sum(p.numel() for p in inner.parameters()) - inner.ffn.inactive_params()
    f = round(0.25 * 32) / 32
    assert model.skipped_params() == pytest.approx((1 - f) * block_active)
    active = model.get_num_params()[1]
    expected = 6 * (active - (1 - f) * block_active) + 12 * 48 * 32 * (1 + f * f)
    assert model.flops_per_token() == pytest.approx(expected)
    assert build_model(make_config([MOE, {}], **ROPE)).skipped_params() == 0


@pytest.mark.parametrize("fields,message", [
    (dict(capacity=0.0), r"layer 0: capacity=0.0 must be in \(0, 1\]"),
    (dict(capacity=1.5), r"layer 0: capacity=1.5 must be in \(0, 1\]"),
    (dict(mod_predictor_dim=0), "layer 0: mod_predictor_dim=0 must be >= 1"),
    (dict(window=8), "layer 0: mod=true with window=8: .* drop window on this layer or drop mod"),
    (dict(attn="nsa"), "layer 0: mod=true with attn='nsa': .* use another attn on this layer or drop mod"),
])
def test_bad_routed_layer_fields_are_refused_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        make_config({**MOD, **fields})
    make_config({**MOD, **fields, "mod": False})  # fields of a layer that does not route are ignored


def test_routing_needs_a_causal_objective_a_masking_kernel_and_a_routed_layer_for_every_other(monkeypatch):
    from llm.model.mixers import attention

    monkeypatch.setattr(attention, "FLASH", {4: None})  # as if flash-attn were installed
    with pytest.raises(ConfigError, match="mod=true routes tokens causally at evaluation, but objective='mlm'"):
        make_config(MOD, objective="mlm")
    with pytest.raises(ConfigError, match="flash-attn does not take; use --attn_backend auto"):
        make_config(MOD, attn_backend="flash")
    with pytest.raises(ConfigError, match="mod_every_other=true routes only odd layers"):
        make_config([MOD, {}], mod_every_other=True)
    with pytest.raises(ConfigError, match="mod_every_other=true routes only odd layers"):
        make_config({}, mod_every_other=True)


def test_every_other_routes_the_odd_layers_among_those_with_mod():
    model = build_model(make_config(MOD, n_layer=4, mod_every_other=True))
    assert [isinstance(b, RoutedBlock) for b in model.blocks] == [False, True, False, True]
    model = build_model(make_config([MOD, MOD, {}, {}, MOD], mod_every_other=False))
    assert [isinstance(b, RoutedBlock) for b in model.blocks] == [True, True, False, False, True]


def test_flags_and_layer_specs_set_the_routing(tmp_path):
    model, _ = parse(["--mod", "--capacity", "0.5", "--mod_every_other", "--n_layer", "4"])
    assert [b.mod for b in model.layers] == [True] * 4 and model.layers[0].capacity == 0.5 and model.mod_every_other
    specs = tmp_path / "layers.jsonl"
    line = '{"attn": "mha", "n_head": 4, "ffn": "dense", "up_dim": 64, "non_linearity": "gelu"'
    specs.write_text(f"{line}}}\n{line}, \"mod\": true, \"capacity\": 0.125}}\n")
    model, _ = parse(["--layer_configs_jsonl", str(specs), "--n_embd", "32"])
    assert [(b.mod, b.capacity) for b in model.layers] == [(False, 0.125), (True, 0.125)]
    specs.write_text(f"{line}, \"mod\": true, \"capacity\": 2}}\n")
    with pytest.raises(ConfigError, match=r"layers.jsonl line 1: capacity=2.0 must be in \(0, 1\]"):
        parse(["--layer_configs_jsonl", str(specs), "--n_embd", "32"])


def test_export_to_transformers_is_refused():
    from llm.hf import family

    with pytest.raises(ConfigError, match="cannot export: mod=true"):
        family(make_config([MOD, {}], **ROPE))


TRAIN = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
         "--total_batch_size_str", "2*4*32", "--pos_emb", "rope", "--norm", "rms", "--mod", "--capacity", "0.25",
         "--mod_predictor_dim", "8", "--moe", "--n_exp", "4", "--n_act", "3", "--aux_free", "--up_dim", "32",
         "--learning_rate", "3e-3", "--warmup_steps", "2", "--log_interval", "1", "--eval", "--eval_interval", "3",
         "--eval_iters", "2", "--max_iters", "6"]


def test_training_end_to_end_reports_flops_and_routing_and_resumes_exactly(char_data, tmp_path):
    def run(name: str, *extra: str) -> list[dict]:
        train(*parse(TRAIN + ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path),
                              "--wandb_run_name", name, *extra]))
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    full = run("full", "--save_model", "--ckpt_interval", "3")
    rows = {row["step"]: row for row in full}
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["aux_loss"]) for row in full)
    _, model, _ = load_trained(str(tmp_path / "full"))
    assert [type(b) for b in model.blocks] == [RoutedBlock, RoutedBlock]
    assert model.skipped_params() > 0 and rows[5]["flops_per_token"] == model.flops_per_token()
    for i in range(2):
        assert 0 <= rows[5][f"mod_routed_frac/layer{i}"] <= 1 and 0 <= rows[5][f"mod_predictor_acc/layer{i}"] <= 1
        assert len(rows[5][f"load_fractions/layer{i}"]) == 3  # MoE statistics still flow
    assert math.isfinite(rows[5]["val_loss"])
    resumed = run("resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "step_0000003"))
    assert [(r["step"], r["loss"], r["val_loss"] if "val_loss" in r else None) for r in resumed] == \
           [(r["step"], r["loss"], r.get("val_loss")) for r in full if r["step"] >= 3]
    assert len(generate(model, [[1, 2, 3]], max_new_tokens=5, temperature=0)[0]) == 5
