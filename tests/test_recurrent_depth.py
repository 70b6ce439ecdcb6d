"""Recurrent depth (Geiping et al. 2025): the recurrence against a direct implementation, truncated backpropagation,
the sampling of r, causality, the cache, parameter and FLOP counts, exact resume, the metrics and the refusals."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm.cli import parse
from llm.config import ConfigError
from llm.generate import generate
from llm.model import LLM, build_model
from llm.model.arch.recurrent import sample_recurrence
from llm.train import train
from tests.conftest import REPO, make_config

RD = dict(n_layer=4, arch="recurrent", n_prelude=1, n_core=2, n_coda=1, mean_recurrence=3, r_max=6, k_trunc=2,
          eval_recurrence=3)
ADAPTERS = ["concat", "add"]


def rd_config(layers: dict | None = None, **fields):
    """A small validated recurrent-depth config: 1 prelude, 2 core and 1 coda layers, r-bar 3, k_trunc 2."""
    return make_config(layers, **{**RD, **fields})


def reference_forward(model: LLM, idx: torch.Tensor, r: int, k: int, state: torch.Tensor) -> torch.Tensor:
    """The loss of the definition, written out: e = prelude(embedding), s_i = core(adapter([s_{i-1}; e])) from
    s_0 = state, the state detached after each of the first r - k iterations, then the coda, norm and head."""
    c = model.config
    positions = torch.arange(idx.size(1))[None]
    x = model.tok_emb(idx) + model.pos_emb(positions)
    blocks = list(model.blocks)
    for block in blocks[:c.n_prelude]:
        x = block(x, positions)[0]
    e = x
    s = state
    for i in range(r):
        if c.adapter_mode == "concat":
            s = model.recurrence.adapter(torch.cat((s, e), dim=-1))
        else:
            s = s + e
        for block in blocks[c.n_prelude:c.n_prelude + c.n_core]:
            s = block(s, positions)[0]
        if i < r - k:
            s = s.detach()
    for block in blocks[c.n_prelude + c.n_core:]:
        s = block(s, positions)[0]
    logits = model.lm_head(model.ln_f(s))[..., :c.vocab_size]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())


@pytest.mark.parametrize("adapter_mode", ADAPTERS)
@pytest.mark.parametrize("r,k", [(5, 2), (2, 4), (3, 3)])
def test_loss_and_gradients_equal_the_direct_definition_with_truncated_backprop(adapter_mode, r, k):
    model = build_model(rd_config(adapter_mode=adapter_mode, k_trunc=k, s0_std=0.5)).train()
    model.recurrence.train_recurrence = r
    idx = torch.randint(0, 97, (2, 12))
    torch.manual_seed(7)
    out = model(idx, idx)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(7)  # the model's first draw is its initial state
    state = 0.5 * torch.randn(2, 12, 48)
    expected = reference_forward(model, idx, r, k, state)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert out.stats["rd/recurrence"].item() == r and len(out.layer_stats) == 4


def test_truncation_changes_the_gradient_of_the_prelude():
    """Backpropagating through every iteration gives the prelude another gradient than through the last one only."""
    idx = torch.randint(0, 97, (2, 12))
    prelude_grads = []
    for k in (1, 4):
        torch.manual_seed(0)
        model = build_model(rd_config(k_trunc=k)).train()
        model.recurrence.train_recurrence = 4
        model(idx, idx).loss.backward()
        prelude_grads.append(model.blocks[0].attn.c_attn.weight.grad)
    assert not torch.allclose(*prelude_grads)


@pytest.mark.parametrize("adapter_mode", ADAPTERS)
def test_eval_mode_starts_from_zeros_at_eval_recurrence_and_is_causal(adapter_mode):
    model = build_model(rd_config(adapter_mode=adapter_mode, eval_recurrence=4)).eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        out = model(idx, idx, return_logits=True)
        expected = reference_forward(model, idx, 4, 2, torch.zeros(2, 16, 48))
        torch.testing.assert_close(out.loss, expected)
        assert out.logits.shape == (2, 16, 97) and out.stats["rd/recurrence"].item() == 4
        for t in (3, 10):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 97
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :t], out.logits[:, :t])
            assert not torch.allclose(logits[:, t], out.logits[:, t])
        with model.recurrence.evaluated_at(1):
            assert model(idx).logits.shape == (2, 16, 97) and model(idx, idx).stats["rd/recurrence"].item() == 1
        assert model(idx, idx).stats["rd/recurrence"].item() == 4


@pytest.mark.parametrize("adapter_mode", ADAPTERS)
def test_cached_decoding_equals_the_full_forward_pass(adapter_mode):
    model = build_model(rd_config(dict(attn="gqa", n_head=4, n_kv_heads=2), adapter_mode=adapter_mode, pos_emb="rope",
                          eval_recurrence=3)).eval()
    idx = torch.randint(0, 97, (2, 12))
    pad = torch.tensor([0, 3])
    cache = model.new_cache(2, pad)
    assert len(cache.layers) == 1 + 3 * 2 + 1  # prelude, one cache per core layer and iteration, coda
    with torch.no_grad():
        pieces = [model(idx[:, :7], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits
                                                             for t in range(7, 12)]
        cached = torch.cat(pieces, dim=1)
        full = model(idx).logits
        row = model(idx[1:, 3:]).logits  # the padded row alone, without its padding
    torch.testing.assert_close(cached[0], full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached[1, 3:], row[0], rtol=1e-4, atol=1e-5)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5]]
    assert generate(model, prompts, 6, temperature=0) == generate(model, prompts, 6, temperature=0, use_cache=False)


def test_cache_bytes_count_one_cache_per_core_iteration():
    plain = build_model(make_config(n_layer=4)).cache_bytes_per_token()
    model = build_model(rd_config(eval_recurrence=5))
    assert model.cache_bytes_per_token() == plain // 4 * (1 + 2 * 5 + 1)


def expected_capped_mean(mean: float, var: float, r_max: int) -> float:
    """E[min(Poisson(e^tau) + 1, r_max)] for tau ~ N(log mean - var / 2, var), by quadrature over tau."""
    sigma = math.sqrt(var)
    taus = np.linspace(-9 * sigma, 9 * sigma, 20001) + math.log(mean) - var / 2
    density = np.exp(-0.5 * ((taus - math.log(mean) + var / 2) / sigma) ** 2)
    density /= density.sum()
    total = 0.0
    for tau, weight in zip(taus, density):
        rate = math.exp(tau)
        pmf = [math.exp(n * tau - rate - math.lgamma(n + 1)) for n in range(r_max - 1)]  # P(N = n), n < r_max - 1
        total += weight * (sum((n + 1) * p for n, p in enumerate(pmf)) + r_max * (1 - sum(pmf)))
    return total


@pytest.mark.parametrize("mean,var,r_max", [(32, 0.25, 10**6), (32, 3.0, 64), (8, 0.25, 10)])
def test_recurrence_sampling_follows_the_log_normal_poisson(mean, var, r_max):
    config = rd_config(mean_recurrence=mean, lognorm_var=var, r_max=r_max)
    draws = np.array([sample_recurrence(config, 1337, step) for step in range(20000)])
    assert draws.min() >= 1 and draws.max() <= r_max
    expected = mean + 1 if r_max > 10**5 else expected_capped_mean(mean, var, r_max)
    assert abs(draws.mean() - expected) < 4 * draws.std() / math.sqrt(len(draws)), (draws.mean(), expected)
    if r_max <= 64:
        assert (draws == r_max).any()


def test_zero_variance_draws_one_plus_a_poisson_of_the_mean():
    draws = np.array([sample_recurrence(rd_config(mean_recurrence=20, lognorm_var=0.0, r_max=1000), 5, s)
                      for s in range(5000)])
    assert abs(draws.mean() - 21) < 0.2 and abs(draws.var() - 20) < 1.5  # about 3 standard errors each


def test_recurrence_depends_on_the_seed_and_step_only():
    config = rd_config(mean_recurrence=32, r_max=64)
    first = [sample_recurrence(config, 1337, step) for step in range(50)]
    assert first == [sample_recurrence(config, 1337, step) for step in range(50)]
    assert first != [sample_recurrence(config, 1338, step) for step in range(50)]
    assert len(set(first)) > 5
    model = build_model(config)
    model.before_step(17, 1337)
    assert model.recurrence.train_recurrence == first[17]


def test_parameter_count_counts_the_core_once_and_the_adapter():
    V, T, C = 128, 32, 48  # vocabulary 97 padded to 128
    block = 12 * C * C + 2 * C  # attention 4C^2, MLP 8C^2, two LayerNorms without bias
    plain = V * C + T * C + 4 * block + C  # tied embedding, learned positions, 4 blocks, final norm
    assert build_model(rd_config()).get_num_params() == (plain + 2 * C * C,) * 2
    assert build_model(rd_config(adapter_mode="add")).get_num_params() == (plain, plain)
    concat, add = (build_model(rd_config(bias=True, adapter_mode=mode)).get_num_params()[0] for mode in ADAPTERS)
    assert concat - add == 2 * C * C + C  # the adapter with its bias
    assert build_model(rd_config()).core_params() == 2 * block + 2 * C * C


def test_flops_count_the_core_at_the_mean_recurrence():
    C, T = 48, 32
    attention = 12 * C * T
    for mean_recurrence, iterations in ((3, 2 + 1 / 3), (1, 1)):  # k_trunc 2: the third iteration runs forward only
        model = build_model(rd_config(mean_recurrence=mean_recurrence, k_trunc=2))
        total, core = model.get_num_params()[1], model.core_params()
        once = 6 * (total - core) + 2 * attention  # prelude and coda
        iteration = 6 * core + 2 * attention  # the core's two layers, forward and backward
        assert model.flops_per_token() == pytest.approx(once + iterations * iteration)


def test_moe_in_the_core_sums_its_loads_over_iterations_and_averages_its_aux_loss_over_the_backprop_ones():
    moe = dict(attn="gqa", n_head=4, n_kv_heads=2, ffn="moe", n_exp=6, n_shared=1, n_act=3, up_dim=32)
    model = build_model(rd_config(moe, k_trunc=2)).train()
    idx = torch.randint(0, 97, (2, 8))
    model.recurrence.train_recurrence = 5
    out = model(idx, idx)
    loads = [stats["load"].sum().item() for stats in out.layer_stats]
    assert loads == [16 * 2, 5 * 16 * 2, 5 * 16 * 2, 16 * 2]  # tokens x routed experts, per iteration
    assert 0 < out.aux_loss.item() < 4 * 0.01 * 5 * 2  # each layer's weighted loss once, not once per iteration
    out.aux_loss.backward()
    assert model.blocks[0].ffn.router.gate.weight.grad.abs().sum() > 0


SMALL = ["--arch", "recurrent", "--n_layer", "3", "--n_prelude", "1", "--n_core", "1", "--n_coda", "1",
         "--mean_recurrence", "3", "--r_max", "6", "--k_trunc", "2", "--eval_recurrence", "3", "--s0_std", "0.1",
         "--recurrence_sweep", "1", "3", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
         "--total_batch_size_str", "2*4*32", "--dropout", "0.1", "--learning_rate", "3e-3", "--warmup_steps", "2",
         "--log_interval", "1", "--eval", "--eval_interval", "3", "--eval_iters", "2", "--max_iters", "6"]


def run(char_data, tmp_path, name: str, *extra: str) -> list[dict]:
    argv = SMALL + ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--wandb_run_name", name, *extra]
    train(*parse(argv))
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact(char_data, tmp_path):
    full = run(char_data, tmp_path, "full", "--save_model", "--ckpt_interval", "3")
    resumed = run(char_data, tmp_path, "second", "--resume", str(tmp_path / "full" / "checkpoints" / "step_0000003"))
    figures = ("loss", "grad_norm", "rd/recurrence", "val_loss", "val_loss_r1")
    assert [[row.get(k) for k in figures] for row in resumed] == [[row.get(k) for k in figures] for row in full[3:]]
    config = rd_config(mean_recurrence=3, r_max=6)
    assert [row["rd/recurrence"] for row in full] == [sample_recurrence(config, 1337, step) for step in range(6)]


def test_train_py_logs_the_recurrence_and_the_loss_against_r(char_data, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *SMALL, "--data_dir", str(char_data.parent),
                             "--out_dir", str(tmp_path), "--compile"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compiling (torch.compile): the first step takes longer" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(1 <= row["rd/recurrence"] <= 6 for row in rows)
    evaluated = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in evaluated] == [2, 5]
    for row in evaluated:
        assert row["val_loss_r3"] == row["val_loss"]  # eval_recurrence, on the same batches
        assert row["val_loss_r1"] != row["val_loss"] and math.isfinite(row["val_loss_r1"])
    sampled = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "run"),
                              "--max_new_tokens", "5"], capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-2000:]


@pytest.mark.parametrize("flags,message", [
    (["--n_core", "3"], "n_core=3 is read only by arch=recurrent models; add --arch recurrent or drop --n_core"),
    (["--recurrent_depth"], "arch=recurrent splits the layers, but n_prelude=2 + n_core=4 + n_coda=2 = 8 differs "
                            "from n_layer=4; make them equal"),
    (["--recurrent_depth", "--n_layer", "8", "--k_trunc", "0"], "k_trunc=0 must be >= 1"),
    (["--recurrent_depth", "--n_layer", "8", "--r_max", "0"], "r_max=0 must be >= 1"),
    (["--recurrent_depth", "--n_layer", "8", "--n_core", "0", "--n_prelude", "4", "--n_coda", "4"],
     "n_core=0 must be >= 1"),
    (["--recurrent_depth", "--n_layer", "8", "--lognorm_var", "-1"], "lognorm_var=-1.0 must be >= 0"),
    (["--recurrent_depth", "--n_layer", "8", "--s0_std", "-0.1"], "s0_std=-0.1 must be >= 0"),
    (["--recurrent_depth", "--n_layer", "8", "--recurrence_sweep", "0", "4"], "recurrence_sweep=[0, 4] must hold"),
    (["--recurrent_depth", "--n_layer", "8", "--mod"], "arch=recurrent with mod=true layers"),
])
def test_bad_recurrent_depth_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError) as error:
        parse(flags)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_train_py_reports_a_bad_split_in_one_line():
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--recurrent_depth", "--n_layer", "6"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: arch=recurrent splits the layers")


def test_export_refuses_a_recurrent_depth_model():
    from llm.hf import family

    with pytest.raises(ConfigError, match="cannot export: arch=recurrent"):
        family(rd_config())


def test_recurrent_depth_is_a_spelling_of_arch_recurrent(tmp_path):
    """--recurrent_depth and a config file's "recurrent_depth": true (the earlier field) both mean arch recurrent."""
    flags = ["--n_layer", "3", "--n_prelude", "1", "--n_core", "1", "--n_coda", "1"]
    assert parse(["--recurrent_depth", *flags])[0] == parse(["--arch", "recurrent", *flags])[0]
    earlier = {"model": {"recurrent_depth": True, "n_layer": 3, "n_prelude": 1, "n_core": 1, "n_coda": 1}}
    (tmp_path / "rd.json").write_text(json.dumps(earlier))
    assert parse(["--config", str(tmp_path / "rd.json")])[0].arch == "recurrent"
    with pytest.raises(ConfigError, match='"recurrent_depth": true contradicts "arch": "ngpt"'):
        (tmp_path / "both.json").write_text(json.dumps({"model": {**earlier["model"], "arch": "ngpt"}}))
        parse(["--config", str(tmp_path / "both.json")])


def test_eval_recurrence_defaults_to_the_mean_training_recurrence():
    """Unset, eval mode runs mean_recurrence iterations (a model trained at r-bar 4 is not judged at 32)."""
    model = build_model(rd_config(mean_recurrence=4, eval_recurrence=None))
    assert model.recurrence.eval_recurrence == 4
    assert len(model.new_cache(1).layers) == 1 + 4 * 2 + 1  # prelude, the core's two layers x 4, coda
    with pytest.raises(ConfigError, match="eval_recurrence=0 must be >= 1"):
        rd_config(eval_recurrence=0)
