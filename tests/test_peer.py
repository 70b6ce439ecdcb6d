"""PEER: product-key retrieval against scoring every expert, gradients, parameter counts, memory at 2**20 experts,
usage reports, config checks, and a mixed dense/MoE/PEER stack that trains."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import BlockConfig, ConfigError, LLMconfig, Trainconfig
from llm.model import build_model
from llm.model.ffn.peer import Peer, candidates_per_table, ceil_root
from llm.train import train
from tests.conftest import make_config

C = 16


def peer_layer(bias: bool = False, n_embd: int = C, **spec) -> Peer:
    """One PEER layer with its weights initialised as in a model."""
    config = make_config(dict(ffn="peer", **spec), n_embd=n_embd, n_layer=1, bias=bias)
    return build_model(config).blocks[0].ffn


def brute_force(layer: Peer, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The layer's output (N, C) in float64 with every expert scored by its full product key (the sum over the tables
    of query chunk . sub-key), the top k per head, a softmax over them, and the experts applied one by one; also the
    chosen experts per token and head."""
    x = x.double()
    N, n, H, k, hidden = x.shape[0], len(layer.sizes), layer.heads, layer.top_k, layer.hidden
    bias = None if layer.query.bias is None else layer.query.bias.double()
    q = F.linear(x, layer.query.weight.double(), bias).view(N, H, -1)  # (N, H, D)
    if layer.query_norm is not None:
        norm = layer.query_norm
        q = F.layer_norm(q, q.shape[-1:], norm.weight.double(), None if norm.bias is None else norm.bias.double(),
                         norm.eps)
    q = F.normalize(q.view(N, H, n, -1), dim=-1)  # (N, H, n, D/n)
    keys = [F.normalize(K.double(), dim=-1) for K in layer.sub_keys]
    digits = []  # per expert, its row in each table (mixed radix, table 0 most significant)
    for e in range(layer.num_experts):
        row = []
        for size in reversed(layer.sizes):
            row.append(e % size)
            e //= size
        digits.append(row[::-1])
    out, chosen = torch.zeros(N, x.shape[1], dtype=torch.float64), []
    for t in range(N):
        for h in range(H):
            scores = torch.stack([sum(q[t, h, i] @ keys[i][d[i]] for i in range(n)) for d in digits])  # (E,)
            top = scores.topk(k)
            chosen.append(sorted(top.indices.tolist()))
            for w, e in zip(top.values.softmax(dim=0), top.indices.tolist()):
                down = layer.down.weight[e].double().view(hidden, -1)  # (hidden, C)
                up = layer.up.weight[e].double().view(hidden, -1)  # (hidden, C)
                out[t] += w * (up.T @ F.gelu(down @ x[t]))
    return out, chosen


CASES = {
    "two_tables": dict(num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2, query_dim=16),
    "two_tables_truncated": dict(num_experts=48, product_key_dim=[3, 16], num_experts_per_tok=6, num_heads=3,
                                 query_dim=8, expert_hidden_size=2),  # k' = 6 on table 1, all 3 rows of table 0
    "two_tables_all_experts": dict(num_experts=6, product_key_dim=[2, 3], num_experts_per_tok=6, num_heads=1,
                                   query_dim=4, batch_norm_query=False),
    "one_table": dict(num_experts=24, product_key_dim=[24], num_experts_per_tok=5, num_heads=2, query_dim=8),
    "three_tables": dict(num_experts=60, product_key_dim=[3, 4, 5], num_experts_per_tok=8, num_heads=2,
                         query_dim=12, expert_hidden_size=2),  # k' = 8 is truncated to every table's size
    "three_tables_small_k": dict(num_experts=216, product_key_dim=[6, 6, 6], num_experts_per_tok=2, num_heads=2,
                                 query_dim=6, batch_norm_query=False),  # k' = ceil(2^(1/3)) + 2 = 4 of 6 rows
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
def test_output_equals_scoring_every_expert(case, bias):
    layer = peer_layer(bias=bias, **CASES[case]).eval()
    with torch.no_grad():
        for table in (layer.down.weight, layer.up.weight, layer.query.weight, *layer.sub_keys):
            table.normal_()  # outputs of order 1, so that the tolerance means something
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        out = layer(x).out.reshape(10, C)
        scores, index = layer.retrieve(x.reshape(10, C))
    expected, chosen = brute_force(layer, x.reshape(10, C))
    assert index.reshape(-1, layer.top_k).sort(dim=-1).values.tolist() == chosen
    assert (out.double() - expected).abs().max().item() <= 1e-5
    assert expected.abs().max() > 0.1


def test_candidates_per_table():
    assert [ceil_root(k, n) for k, n in ((16, 2), (8, 3), (9, 2), (10, 2), (1, 3), (27, 3), (28, 3))] == \
        [4, 2, 3, 4, 1, 3, 4]
    assert candidates_per_table(16, [1024, 1024]) == [16, 16]
    assert candidates_per_table(1, [8, 8]) == [3, 3]  # ceil(1) + 2
    assert candidates_per_table(2, [6, 6, 6]) == [4, 4, 4]
    assert candidates_per_table(8, [3, 4, 5]) == [3, 4, 5]
    assert candidates_per_table(5, [24]) == [7]  # n = 1: ceil(5) + 2


def test_gradients_reach_the_query_the_sub_keys_and_exactly_the_chosen_experts():
    layer = peer_layer(**CASES["two_tables"], bias=True)
    x = torch.randn(2, 3, C, requires_grad=True)
    out = layer(x).out
    (out * torch.randn_like(out)).sum().backward()
    with torch.no_grad():
        _, index = layer.retrieve(x.reshape(6, C))
    chosen = set(index.unique().tolist())
    assert 0 < len(chosen) < layer.num_experts
    for name in ("query.weight", "query.bias", "query_norm.weight", "query_norm.bias", "sub_keys.0", "sub_keys.1"):
        assert layer.get_parameter(name).grad.abs().sum() > 0, name
    for table in (layer.down, layer.up):
        rows = set(table.weight.grad.abs().sum(dim=1).nonzero().flatten().tolist())
        assert rows == chosen
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", ["two_tables", "two_tables_truncated", "two_tables_all_experts", "three_tables"])
def test_parameter_counts_in_closed_form(case, bias):
    spec = {"expert_hidden_size": 1, "batch_norm_query": True, **CASES[case]}
    layer = peer_layer(bias=bias, **spec)
    H, D, E, k = spec["num_heads"], spec["query_dim"], spec["num_experts"], spec["num_experts_per_tok"]
    hidden, n = spec["expert_hidden_size"], len(spec["product_key_dim"])
    query = C * H * D + bias * H * D
    norm = (D + bias * D) if spec["batch_norm_query"] else 0
    sub_keys = sum(spec["product_key_dim"]) * (D // n)
    experts = 2 * E * C * hidden
    assert sum(p.numel() for p in layer.parameters()) == query + norm + sub_keys + experts
    assert layer.inactive_params() == 2 * C * hidden * max(0, E - H * k)
    model = build_model(make_config([dict(ffn="peer", **spec), {}], n_embd=C, bias=bias))
    total, active = model.get_num_params()
    assert total - active == 2 * C * hidden * max(0, E - H * k)


def test_every_head_picking_more_than_the_pool_leaves_nothing_inactive():
    layer = peer_layer(num_experts=16, product_key_dim=[4, 4], num_experts_per_tok=8, num_heads=4, query_dim=8)
    assert layer.inactive_params() == 0


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.numel, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        self.ops.add(func.__name__)
        return out


def test_a_million_experts_never_form_a_tokens_by_experts_tensor():
    """2**20 experts and 8 x 256 tokens: a (tokens, num_experts) tensor would hold 2**31 values (8 GiB in fp32); no
    operator of the forward or backward pass returns anything beyond the per-table scores (tokens, heads, 1024)."""
    E, sizes, H, k = 2**20, [1024, 1024], 8, 16
    block = BlockConfig(ffn="peer", num_experts=E, product_key_dim=sizes, num_experts_per_tok=k, num_heads=H,
                        query_dim=64)
    layer = Peer(block, LLMconfig(vocab_size=97, n_embd=8))
    x = torch.randn(8, 256, 8, requires_grad=True)
    N = x.shape[0] * x.shape[1]
    with LargestTensor() as seen:
        out = layer(x)
        (out.out.square().sum()).backward()
    assert "embedding_dense_backward.default" in seen.ops  # the backward pass ran under the mode
    assert seen.numel <= max(N * H * max(sizes), E * 8)  # per-table scores; an expert table's gradient
    assert seen.numel * 100 < N * E
    assert out.stats["usage"].sum().item() == N * H * k


def report(layer: Peer, counts: torch.Tensor) -> dict:
    """One optimizer step of the layer's hooks as the loop runs them on a logged step."""
    layer.after_step({"usage": counts})
    return layer.metrics({"usage": counts})


def test_usage_is_reported_every_peer_log_interval_steps():
    model = build_model(make_config([dict(ffn="peer", **CASES["two_tables"]), {}], n_embd=C))
    model.configure_run(Trainconfig(peer_log_interval=3, usage_threshold=5.0))
    layer = model.blocks[0].ffn
    counts = torch.zeros(64, dtype=torch.long)
    counts[:48] = 1  # 48 experts picked once
    counts[48:50] = 100  # 2 picked 100 times: mean (48 + 200) / 64 = 3.875, hot above 5 * 3.875
    counts[50:53] = 19  # below 5 * mean
    assert report(layer, counts) == {} and report(layer, torch.zeros_like(counts)) == {}
    figures = report(layer, counts)
    assert figures == {"experts_used": pytest.approx(53 / 64), "hot_experts": 2}
    assert layer.counts.sum() == 0  # counting starts again after each report
    later = torch.zeros_like(counts)
    later[:8] = 1
    later[9] = 30  # mean 38 / 64, hot above 2.97
    assert report(layer, later) == {} and report(layer, torch.zeros_like(counts)) == {}
    assert report(layer, later) == {"experts_used": pytest.approx(9 / 64), "hot_experts": 1}
    model.configure_run(Trainconfig(peer_log_interval=1, usage_threshold=0.5))
    assert report(layer, later) == {"experts_used": pytest.approx(9 / 64), "hot_experts": 9}
    with pytest.raises(ConfigError, match="peer_log_interval=0 must be >= 1"):
        model.configure_run(Trainconfig(peer_log_interval=0))


def test_usage_counts_are_training_stats_only():
    layer = peer_layer(**CASES["two_tables"])
    x = torch.randn(2, 3, C)
    assert layer(x).stats["usage"].sum().item() == 6 * 2 * 4
    assert layer.eval()(x).stats == {}


@pytest.mark.parametrize("spec,message", [
    (dict(num_experts=100, product_key_dim=[8, 8]),
     "num_experts=100 must equal the product of product_key_dim=[8, 8], 64; set --num_experts 64 or change "
     "--product_key_dim"),
    (dict(num_experts=60, product_key_dim=[3, 4, 5], query_dim=10),
     "query_dim=10 must be a positive multiple of the 3 sub-key tables of product_key_dim=[3, 4, 5] (each table takes "
     "query_dim / 3); use --query_dim 9"),
    (dict(num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=65),
     "num_experts_per_tok=65 must be in [1, num_experts=64]; lower --num_experts_per_tok or grow product_key_dim"),
    (dict(num_experts=1, product_key_dim=[]), "product_key_dim=[] must list one or more sub-key table sizes >= 1"),
    (dict(num_experts=64, product_key_dim=[8, 8], num_heads=0), "num_heads=0 must be >= 1"),
])
def test_config_errors_name_the_field_value_and_fix(spec, message):
    layer = {"ffn": "peer", "num_experts_per_tok": 4, "query_dim": 16, **spec}
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(layer)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(["--ffn", "peer", *[arg for key, value in layer.items() for arg in flag(key, value)]])


def flag(key: str, value) -> list[str]:
    """A field as command-line arguments (lists as one value per argument)."""
    if isinstance(value, bool):
        return [f"--{key}" if value else f"--no_{key}"]
    return [f"--{key}", *map(str, value if isinstance(value, list) else [value])]


def test_product_key_dim_is_a_list_in_flags_and_layer_specs():
    model, _ = parse(["--ffn", "peer", "--product_key_dim", "4", "4", "2", "--num_experts", "32", "--query_dim", "6"])
    assert model.layers[0].product_key_dim == [4, 4, 2]
    spec = {"attn": "mha", "n_head": 4, "ffn": "peer", "up_dim": 8, "non_linearity": "gelu", **CASES["two_tables"]}
    model, _ = parse(["--layer_configs", json.dumps([spec])])
    assert model.layers[0].product_key_dim == [8, 8]
    with pytest.raises(ConfigError, match=re.escape("product_key_dim=8 must be a list, got int")):
        parse(["--layer_configs", json.dumps([{**spec, "product_key_dim": 8}])])
    with pytest.raises(ConfigError, match=re.escape("product_key_dim='8' must be int, got str")):
        parse(["--layer_configs", json.dumps([{**spec, "product_key_dim": ["8", 8]}])])


def test_stack_of_dense_moe_and_peer_layers_trains_and_reloads(char_data, tmp_path):
    common = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "non_linearity": "gelu"}
    layers = [{**common, "ffn": "dense", "up_dim": 64},
              {**common, "ffn": "moe", "up_dim": 32, "n_exp": 4, "n_shared": 1, "n_act": 3},
              {**common, "ffn": "peer", "up_dim": 64, **CASES["two_tables"]}]
    path = tmp_path / "layers.jsonl"
    path.write_text("".join(json.dumps(layer) + "\n" for layer in layers))
    argv = ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--layer_configs_jsonl", str(path),
            "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--total_batch_size_str", "2*4*32",
            "--max_iters", "4", "--log_interval", "1", "--peer_log_interval", "2", "--usage_threshold", "3",
            "--warmup_steps", "1", "--save_model", "--pos_emb", "rope"]
    train(*parse(argv))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3] and all(math.isfinite(row["loss"]) for row in rows)
    assert [("experts_used/layer2" in row) for row in rows] == [False, True, False, True]  # every 2 steps
    assert all(0 < row["experts_used/layer2"] <= 1 and row["hot_experts/layer2"] >= 0 for row in rows[1::2])
    assert "load_fractions/layer1" in rows[0] and "experts_used/layer1" not in rows[1]
    _, model, _ = load_trained(str(tmp_path / "run"))  # config.json's product_key_dim list reads back
    assert isinstance(model.blocks[2].ffn, Peer) and model.blocks[2].ffn.sizes == [8, 8]
