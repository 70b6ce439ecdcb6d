"""--optimizer muon: the Newton-Schulz iteration, Muon's update and AdamW's against references written here, the
param groups, the per-step learning rates and momentum, the refusals, training and bit-exact resume, and the FSDP2
shard path."""
import json
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from llm.cli import parse
from llm.config import ConfigError, Trainconfig
from llm.model import LLM, build_model
from llm.train import train
from llm.train.muon import NS_COEFFICIENTS, NS_STEPS, Muon, newton_schulz, orthogonalized
from llm.train.optim import Schedule, build_optimizer, muon_momentum, set_step_hyperparameters
from tests.conftest import make_config

MOE = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "ffn": "moe", "n_exp": 5, "n_shared": 1, "n_act": 3, "up_dim": 24}
PEER = {"ffn": "peer", "num_experts": 64, "num_experts_per_tok": 4, "num_heads": 2, "expert_hidden_size": 1,
        "product_key_dim": [8, 8], "query_dim": 16}


def reference_newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """The definition, one float64 matrix at a time: X = G / ||G||_F (transposed when tall), then NS_STEPS times
    X <- a X + b (X X^T) X + c (X X^T)(X X^T) X."""
    a, b, c = NS_COEFFICIENTS
    X = G.double().T if G.shape[0] > G.shape[1] else G.double()
    X = X / X.norm()
    for _ in range(NS_STEPS):
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if G.shape[0] > G.shape[1] else X


def with_singular_values(rows: int, cols: int, values: torch.Tensor) -> torch.Tensor:
    """A random (rows, cols) matrix U diag(values) V^T."""
    U, _ = torch.linalg.qr(torch.randn(rows, len(values), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, len(values), dtype=torch.float64))
    return U @ torch.diag(values.double()) @ V.T


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
def test_newton_schulz_approximates_the_orthogonal_factor(shape):
    rows, cols = shape
    G = with_singular_values(rows, cols, torch.linspace(1, 20, min(shape))).float()
    assert newton_schulz(G).dtype == torch.float32  # on CPU; bf16 on CUDA
    X = newton_schulz(G, dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16 and X.shape == shape
    singular = torch.linalg.svdvals(X.double())
    assert singular.min() > 0.65 and singular.max() < 1.25  # the band of these coefficients (0.68..1.20), in bf16
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert torch.cosine_similarity((U @ Vh).flatten(), X.double().flatten(), dim=0) > 0.97
    assert relative_error(X, reference_newton_schulz(G)) < 0.06  # bf16 rounding
    torch.testing.assert_close(newton_schulz(G.double(), dtype=torch.float64, eps=0.0), reference_newton_schulz(G),
                               rtol=1e-9, atol=1e-9)


def test_newton_schulz_acts_on_each_singular_value_as_the_scalar_polynomial():
    """U diag(s) V^T maps to U diag(f(f(...f(s / |s|)))) V^T with f(x) = a x + b x^3 + c x^5."""
    values = torch.linspace(0.5, 10, 24, dtype=torch.float64)
    a, b, c = NS_COEFFICIENTS
    x = values / values.norm()
    for _ in range(NS_STEPS):
        x = a * x + b * x ** 3 + c * x ** 5
    U, _ = torch.linalg.qr(torch.randn(40, 24, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    G = U @ torch.diag(values) @ V.T
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float64, eps=0.0), U @ torch.diag(x) @ V.T,
                               rtol=1e-9, atol=1e-9)
    assert relative_error(newton_schulz(G.float()), U @ torch.diag(x) @ V.T) < 0.06


def test_newton_schulz_treats_each_matrix_of_a_stack_on_its_own():
    stack = torch.randn(3, 40, 24) * torch.tensor([1.0, 10.0, 0.01])[:, None, None]  # scales must not leak across
    batched = newton_schulz(stack)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(stack[i]), rtol=0.02, atol=0.01)
        torch.testing.assert_close(newton_schulz(stack.double(), dtype=torch.float64, eps=0.0)[i],
                                   reference_newton_schulz(stack[i]), rtol=1e-9, atol=1e-9)


def reference_muon(weight: torch.Tensor, grads: list[torch.Tensor], lr: float, momentums: list[float],
                   weight_decay: float) -> torch.Tensor:
    """Muon's definition, step by step: momentum buffer, Nesterov look-ahead, orthogonalisation (float64, matrix
    by matrix), the max(1, rows/cols)^0.5 scale and decoupled weight decay."""
    weight, buffer = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    rows, cols = weight.shape[-2:]
    for grad, m in zip(grads, momentums):
        buffer = m * buffer + (1 - m) * grad.double()
        look_ahead = (1 - m) * grad.double() + m * buffer
        flat = look_ahead.reshape(-1, rows, cols)
        ortho = torch.stack([reference_newton_schulz(g) for g in flat]).reshape(weight.shape)
        weight = weight * (1 - lr * weight_decay) - lr * max(1, rows / cols) ** 0.5 * ortho
    return weight


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (4, 24, 12)], ids=["tall", "wide", "expert_stack"])
def test_muon_update_matches_its_definition(shape):
    weight = nn.Parameter(torch.randn(shape) * 0.02)
    start = weight.detach().clone()
    grads = [torch.randn(shape) for _ in range(3)]
    momentums = [0.85, 0.9, 0.95]
    optimizer = Muon([dict(params=[weight], use_muon=True, lr=0.05, momentum=0.0, weight_decay=0.1)])
    for grad, m in zip(grads, momentums):
        optimizer.param_groups[0]["momentum"] = m
        weight.grad = grad
        optimizer.step()
    expected = reference_muon(start, grads, 0.05, momentums, 0.1)
    moved = expected - start.double()
    assert relative_error(weight.detach() - start, moved) < 0.03
    # a tall matrix's step is sqrt(rows/cols) times larger: the orthogonal factor's norm is sqrt(min(rows, cols))
    rows, cols = shape[-2:]
    one_step = reference_muon(start, grads[:1], 0.05, momentums[:1], 0.0) - start.double()
    per_matrix = one_step.reshape(-1, rows, cols).norm(dim=(-2, -1))
    expected_norm = 0.05 * max(1, rows / cols) ** 0.5 * math.sqrt(min(rows, cols))
    assert torch.allclose(per_matrix, torch.full_like(per_matrix, expected_norm), rtol=0.2)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ours = nn.Parameter(torch.randn(7, 5))
    theirs = nn.Parameter(ours.detach().clone())
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    muon = Muon([dict(params=[ours], use_muon=False, **settings)])
    adamw = torch.optim.AdamW([theirs], foreach=False, **settings)
    for _ in range(5):
        grad = torch.randn(7, 5)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        muon.step()
        adamw.step()
    assert muon.state[ours]["step"].item() == 5
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_adamw_groups_resume_a_state_whose_step_count_is_an_int():
    """Checkpoints written before the fused kernel hold each AdamW step count as a Python int."""
    ours = nn.Parameter(torch.randn(7, 5))
    theirs = nn.Parameter(ours.detach().clone())
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    muon = Muon([dict(params=[ours], use_muon=False, **settings)])
    adamw = torch.optim.AdamW([theirs], foreach=False, **settings)
    for grad in torch.randn(2, 7, 5):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        muon.step()
        adamw.step()
    state = muon.state_dict()
    state["state"][0]["step"] = 2
    muon.load_state_dict(state)
    ours.grad = theirs.grad = torch.randn(7, 5)
    muon.step()
    adamw.step()
    assert muon.state[ours]["step"].item() == 3
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def groups_by_role(model: LLM, **cfg_fields) -> dict[str, dict]:
    optimizer = build_optimizer(model, Trainconfig(device="cpu", optimizer="muon", **cfg_fields), torch.device("cpu"))
    assert isinstance(optimizer, Muon)
    return {group["role"]: group for group in optimizer.param_groups}


def names(model: LLM, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_param_groups_untied_with_moe_learned_positions_and_biases():
    model = build_model(make_config(MOE, pos_emb="learn", bias=True, tie_embeddings=False))
    groups = groups_by_role(model, weight_decay=0.1, muon_weight_decay=0.01)
    everything = set(dict(model.named_parameters()))
    assert set().union(*(names(model, g) for g in groups.values())) == everything
    assert sum(len(g["params"]) for g in groups.values()) == len(everything)  # each parameter once
    assert names(model, groups["head"]) == {"lm_head.weight"}
    assert names(model, groups["embed"]) == {"tok_emb.weight", "pos_emb.table.weight"}
    assert names(model, groups["muon"]) == {name for name, p in model.named_parameters()
                                           if p.dim() >= 2 and name.startswith("blocks.")}
    assert {"blocks.0.ffn.experts.c_fc.weight", "blocks.0.ffn.router.gate.weight"} <= names(model, groups["muon"])
    assert all(p.dim() == 1 for p in groups["scalar"]["params"]) and "blocks.0.attn.c_attn.bias" in names(
        model, groups["scalar"])
    expected = {"muon": (0.05, 0.01), "head": (0.008, 0.1), "embed": (0.6, 0.1), "scalar": (0.04, 0.0)}
    assert {role: (g["lr"], g["weight_decay"]) for role, g in groups.items()} == expected
    assert groups["muon"]["use_muon"] and not any(groups[r]["use_muon"] for r in ("head", "embed", "scalar"))


def test_tied_inputs_take_the_head_rate_and_peer_tables_are_scalars():
    model = build_model(make_config(PEER, tie_embeddings=True, pos_emb="learn"))
    groups = groups_by_role(model, decay_embeddings=False)
    assert "embed" not in groups
    assert names(model, groups["head"]) == {"tok_emb.weight", "pos_emb.table.weight"}  # added together: one rate
    assert groups["head"]["lr"] == 0.008 and groups["head"]["weight_decay"] == 0.0  # tables: --no_decay_embeddings
    peer_tables = {f"blocks.{i}.ffn.{t}.weight" for i in range(2) for t in ("down", "up")}
    assert peer_tables <= names(model, groups["scalar"]) and groups["scalar"]["lr"] == 0.04
    assert {"blocks.0.ffn.sub_keys.0", "blocks.0.ffn.query.weight"} <= names(model, groups["muon"])
    assert not peer_tables & names(model, groups["muon"])


def test_state_space_and_convolution_parameters_are_adamw_scalars():
    """Muon orthogonalises matrices: Mamba's A_log and D (no weight decay) and every depthwise convolution (3-D, not
    an expert stack) go to AdamW at scalar_lr; the projections stay Muon's."""
    layers = [{"attn": "mamba", "ffn": "none", "d_state": 4}, {"attn": "hyena", "n_head": 4, "ffn": "dense"}]
    model = build_model(make_config(layers, pos_emb="rope", norm="rms"))
    groups = groups_by_role(model)
    scalars, muon = names(model, groups["scalar"]), names(model, groups["muon"])
    assert {"blocks.0.attn.A_log", "blocks.0.attn.D", "blocks.0.attn.conv1d.weight"} <= scalars
    assert {name for name in scalars if "short_filter" in name}
    assert all(p.dim() == 2 for p in groups["muon"]["params"]) and "blocks.0.attn.in_proj.weight" in muon


def test_adamw_is_unchanged():
    model = build_model(make_config())
    optimizer = build_optimizer(model, Trainconfig(device="cpu"), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 2


def test_step_rates_scale_each_peak_by_the_schedule_and_momentum_warms_up():
    cfg = Trainconfig(device="cpu", optimizer="muon", learning_rate=2e-3, max_iters=1000, warmup_steps=100,
                      lr_schedule="trapezoid", muon_momentum_warmup=300)
    model = build_model(make_config(MOE))
    muon = build_optimizer(model, cfg, torch.device("cpu"))
    adamw = build_optimizer(model, replace(cfg, optimizer="adamw"), torch.device("cpu"))
    schedule = Schedule.of(cfg)
    for step, momentum in ((0, 0.85), (150, 0.9), (300, 0.95), (900, 0.95)):
        lr = set_step_hyperparameters(muon, schedule, cfg, step)
        assert lr == schedule(step)
        for group in muon.param_groups:
            assert group["lr"] == pytest.approx(group["peak_lr"] * schedule(step) / 2e-3, rel=1e-12)
            assert not group["use_muon"] or group["momentum"] == pytest.approx(momentum)
        assert set_step_hyperparameters(adamw, schedule, cfg, step) == lr
        assert all(group["lr"] == lr for group in adamw.param_groups)  # exactly the schedule, as before
    assert muon_momentum(Trainconfig(muon_momentum_warmup=0), 0) == 0.95


@pytest.mark.parametrize("flags,message", [
    (["--muon_lr", "0"], "muon_lr=0.0 must be > 0"),
    (["--head_lr", "-1"], "head_lr=-1.0 must be > 0"),
    (["--embed_lr", "nan"], "embed_lr=nan must be a finite number"),
    (["--scalar_lr", "0"], "scalar_lr=0.0 must be > 0"),
    (["--muon_momentum", "1"], "muon_momentum=1.0 must be in [0, 1)"),
    (["--muon_momentum_start", "-0.1"], "muon_momentum_start=-0.1 must be in [0, 1)"),
    (["--muon_momentum_warmup", "-1"], "muon_momentum_warmup=-1 must be >= 0"),
    (["--muon_weight_decay", "-0.1"], "muon_weight_decay=-0.1 must be >= 0"),
])
def test_bad_muon_settings_are_refused(flags, message):
    with pytest.raises(ConfigError) as error:
        parse(["--optimizer", "muon", *flags])
    assert message in str(error.value)


def test_muon_flags_parse():
    _, cfg = parse(["--optimizer", "muon", "--muon_lr", "0.02", "--muon_momentum", "0.9", "--muon_momentum_start",
                    "0.8", "--muon_momentum_warmup", "10", "--muon_weight_decay", "0.01", "--embed_lr", "0.3",
                    "--head_lr", "0.004", "--scalar_lr", "0.02"])
    assert (cfg.optimizer, cfg.muon_lr, cfg.muon_momentum, cfg.muon_momentum_start, cfg.muon_momentum_warmup) == \
        ("muon", 0.02, 0.9, 0.8, 10)
    assert (cfg.muon_weight_decay, cfg.embed_lr, cfg.head_lr, cfg.scalar_lr) == (0.01, 0.3, 0.004, 0.02)


# A small MoE model with dropout, gradient accumulation, evaluation and a short momentum warm-up.
SMALL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
         "--total_batch_size_str", "2*4*32", "--dropout", "0.1", "--moe", "--n_exp", "4", "--n_act", "3",
         "--aux_free", "--gamma", "0.01", "--up_dim", "32", "--warmup_steps", "2", "--log_interval", "1", "--eval",
         "--eval_interval", "4", "--eval_iters", "2", "--max_iters", "8", "--optimizer", "muon",
         "--muon_momentum_warmup", "6", "--weight_decay", "0", "--beta1", "0.8", "--adam_eps", "1e-10",
         "--lr_schedule", "trapezoid", "--pos_emb", "learn", "--bias", "--no_tie_embeddings"]


def run(char_data, out_dir, name: str, *extra: str) -> dict[int, tuple]:
    argv = SMALL + ["--data_dir", str(char_data.parent), "--out_dir", str(out_dir), "--wandb_run_name", name, *extra]
    train(*parse(argv))
    rows = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: (m["loss"], m["grad_norm"], m.get("val_loss")) for m in rows}


def test_muon_trains_and_resumes_bit_exactly(char_data, tmp_path):
    straight = run(char_data, tmp_path, "straight")
    assert straight[7][2] < straight[3][2] < math.log(65)  # the validation loss falls from chance
    run(char_data, tmp_path, "first", "--save_model", "--ckpt_interval", "3", "--keep_last", "5")
    checkpoint = tmp_path / "first" / "checkpoints" / "step_0000003"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    roles = {group["role"]: group for group in state["optimizer"]["param_groups"]}
    assert set(roles) == {"muon", "head", "embed", "scalar"}
    assert roles["muon"]["momentum"] == pytest.approx(0.85 + 0.1 * 2 / 6)  # set for step 2, the last one done
    kinds = {frozenset(s) for s in state["optimizer"]["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    resumed = run(char_data, tmp_path, "second", "--resume", str(checkpoint))
    assert sorted(resumed) == list(range(3, 8))
    assert all(resumed[step] == straight[step] for step in resumed), (resumed, straight)


def check_shards(rank: int, port: str, failures) -> None:
    """One rank of a 2-process gloo job: orthogonalized() of a DTensor split on dim 0, rows unevenly, equals this
    rank's part of newton_schulz of the whole."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)  # the same full tensors on both ranks
        for shape in ((7, 12), (12, 5), (3, 10, 6)):
            full = torch.randn(shape)
            sharded = distribute_tensor(full, mesh, [Shard(0)])
            result = orthogonalized(sharded)
            assert result.placements == (Shard(0),) and result.shape == full.shape
            expected = distribute_tensor(newton_schulz(full), mesh, [Shard(0)]).to_local()
            assert torch.equal(result.to_local(), expected), shape
    except AssertionError as e:
        failures.put(f"rank {rank}: {e}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_orthogonalized_fsdp_shards_equal_the_whole_matrix():
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(check_shards, args=(str(29700 + os.getpid() % 200), failures), nprocs=2, join=True)
    assert failures.empty(), failures.get()
