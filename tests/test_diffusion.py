"""The discrete diffusion objectives (mdlm, sedd, d3pm) against oracles that do not share their code: exact
enumeration of MDLM's bound, exact conditionals of a tiny known distribution, SEDD's score entropy at the true
ratios, D3PM's transition algebra and posterior by brute-force Bayes, the samplers' output distribution by a chi-square
test, and training, exact resume and sampling end to end."""
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llm.cli import parse
from llm.config import ConfigError, LLMconfig, Trainconfig
from llm.denoise import denoise_window, sample
from llm.eval import main as eval_main
from llm.model import build_model
from llm.model.objectives.d3pm import keep_probabilities
from llm.model.registry import OBJECTIVES
from llm.train import train
from tests.conftest import REPO

V, L = 3, 3  # the toy distribution: sequences of 3 tokens out of 3
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (27, L)
CHI2_999_DF26 = 54.052  # scipy.stats.chi2.ppf(0.999, 26)


def toy_distribution(seed: int = 0) -> torch.Tensor:
    """p over the 27 sequences (27,) fp64, every one likely enough to be sampled."""
    weights = torch.rand(len(SEQUENCES), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.2
    return weights / weights.sum()


def conditionals(p: torch.Tensor, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p(x_l = v | the unmasked tokens of x) (B, L, V) for rows x (B, L) under the toy distribution p."""
    consistent = ((SEQUENCES[None] == x[:, None]) | (x[:, None] == mask_id)).all(-1)  # (B, 27)
    weight = consistent.double() * p  # (B, 27)
    per_value = torch.stack([weight @ F.one_hot(SEQUENCES[:, l], V).double() for l in range(L)], 1)  # (B, L, V)
    return (per_value / weight.sum(-1)[:, None, None]).log()


def config_of(objective: str, **fields) -> LLMconfig:
    return LLMconfig(objective=objective, vocab_size=fields.pop("vocab_size", V), **fields)


def noised_rows(objective: str, config: LLMconfig, x: torch.Tensor, rows: int, seed: int = 0):
    """(x_t, x0, time) for `rows` copies of x (L,) through the objective's batching."""
    batching = OBJECTIVES[objective].batching(None, Trainconfig(), config)
    uniforms = torch.rand(3, rows, len(x), generator=torch.Generator().manual_seed(seed))
    return batching(x.expand(rows, -1).clone(), uniforms)


def sequence_losses(loss, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor):
    """Each row's summed token terms (B,) from logits (B, L, K)."""
    B, T, K = logits.shape
    terms = loss.token_loss(logits.reshape(B * T, K).float(), x0.reshape(-1), x_t.reshape(-1),
                            time[:, None].expand(B, T).reshape(-1))
    return terms.double().reshape(B, T).sum(-1)


def enumerated_nelbo(log_probs_of) -> float:
    """MDLM's expected NELBO of the sequence x in closed form (alpha = 1 - t): the sum over nonempty masked sets M and
    l in M of (|M| - 1)! (L - |M|)! / L! * -log p(x_l | x outside M); log_probs_of(M) gives the log-probabilities (L,)
    of the true tokens with M masked."""
    total = 0.0
    for size in range(1, L + 1):
        weight = math.factorial(size - 1) * math.factorial(L - size) / math.factorial(L)
        for masked in itertools.combinations(range(L), size):
            logp = log_probs_of(masked)
            total += weight * sum(-logp[l].item() for l in masked)
    return total


def test_mdlm_bound_equals_enumeration_and_the_exact_conditionals_give_minus_log_p():
    p, x = toy_distribution(), torch.tensor([2, 0, 1])
    config = config_of("mdlm", noise_eps=1e-6)
    loss, mask = OBJECTIVES["mdlm"].build(config), config.vocab_size
    target = -math.log(p[(SEQUENCES == x).all(-1)].item())

    def exact(masked):
        row = x.clone()
        row[list(masked)] = mask
        return conditionals(p, row[None], mask)[0].gather(1, x[:, None]).squeeze(1)

    assert enumerated_nelbo(exact) == pytest.approx(target, abs=1e-12)  # the any-order identity
    x_t, x0, time = noised_rows("mdlm", config, x, 40_000)
    per_row = sequence_losses(loss, conditionals(p, x_t, mask), x0, x_t, time)
    assert abs(per_row.mean().item() - target) < 4 * per_row.std().item() / math.sqrt(len(per_row))

    table = torch.randn(L, (V + 1) ** L, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes = (V + 1) ** torch.arange(L)

    def table_logits(rows: torch.Tensor) -> torch.Tensor:  # an arbitrary denoiser: logits by position and row
        return torch.stack([table[l, (rows * codes).sum(-1)] for l in range(L)], 1)  # (B, L, V)

    def from_table(masked):
        row = x.clone()
        row[list(masked)] = mask
        return table_logits(row[None])[0].log_softmax(-1).gather(1, x[:, None]).squeeze(1)

    per_row = sequence_losses(loss, table_logits(x_t), x0, x_t, time)
    standard_error = per_row.std().item() / math.sqrt(len(per_row))
    assert abs(per_row.mean().item() - enumerated_nelbo(from_table)) < 4 * standard_error


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "cosinesqr", "geometric"])
def test_schedule_derivatives_match_finite_differences(schedule):
    from llm.model.objectives.diffusion import Schedule

    sched = Schedule(config_of("mdlm", noise_schedule=schedule))
    t, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64), 1e-6
    torch.testing.assert_close(sched.dalpha(t), (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h), rtol=1e-6,
                               atol=1e-8)
    torch.testing.assert_close(sched.dsigma(t), (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h), rtol=1e-6,
                               atol=1e-8)
    sigma = sched.sigma(t)
    torch.testing.assert_close(sched.masking_weight(t), sched.dsigma(t) / torch.expm1(sigma))
    torch.testing.assert_close(sched.alpha(t), torch.exp(-sigma))


def test_mdlm_never_predicts_the_mask_and_unmasked_positions_count_zero():
    model = build_model(parse(["--objective", "mdlm", "--vocab_size", "7", "--n_layer", "1", "--n_embd", "16",
                               "--n_head", "2", "--block_size", "8"])[0])
    x_t = torch.tensor([[7, 1, 7, 2, 3, 7, 0, 0]])
    out = model(x_t, time=torch.tensor([0.5]))
    assert out.logits.shape == (1, 8, 7)  # the data's vocabulary only: the mask is never predicted
    loss = model.objective
    terms = loss.token_loss(torch.randn(8, 7, requires_grad=True), torch.arange(8) % 7, x_t[0], torch.full((8,), 0.5))
    assert (terms[x_t[0] != 7] == 0).all() and (terms[x_t[0] == 7] > 0).all()


@pytest.mark.parametrize("schedule", ["loglinear", "geometric"])
def test_sedd_score_from_a_subs_model_gives_mdlm_loss_term_by_term(schedule):
    config = config_of("sedd", vocab_size=11, noise_schedule=schedule)
    sedd, mdlm = OBJECTIVES["sedd"].build(config), OBJECTIVES["mdlm"].build(config_of("mdlm", vocab_size=11,
                                                                                       noise_schedule=schedule))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 11, generator=generator)
    x0 = torch.randint(0, 11, (64,), generator=generator)
    x_t = torch.where(torch.rand(64, generator=generator) < 0.7, 11, x0)
    time = torch.rand(64, generator=generator) * 0.98 + 0.01
    score = logits.log_softmax(-1) + math.log(11)  # s_y = p(y) / (e^sigma - 1) in SEDD's scaled form
    torch.testing.assert_close(sedd.token_loss(score, x0, x_t, time), mdlm.token_loss(logits, x0, x_t, time))


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_sedd_score_entropy_is_zero_at_the_true_ratios_and_positive_elsewhere(graph):
    vocab = 6
    loss = OBJECTIVES["sedd"].build(config_of("sedd", vocab_size=vocab, diffusion_graph=graph))
    x0 = torch.tensor([0, 1, 2, 3, 4, 5, 2, 3])
    time = torch.linspace(0.05, 0.95, 8)
    sigma = loss.schedule.sigma(time.double())
    if graph == "absorbing":
        x_t = torch.full_like(x0, vocab)
        true = torch.where(F.one_hot(x0, vocab).bool(), math.log(vocab), float("-inf"))  # s_x0 = r, others 0
    else:
        x_t = torch.tensor([0, 1, 2, 3, 0, 0, 5, 1])  # some positions moved, some not
        keep = torch.exp(-sigma)[:, None]
        q = keep * F.one_hot(x0, vocab) + (1 - keep) / vocab  # (n, V) q_t(y | x0)
        true = (q.log() - q.gather(1, x_t[:, None]).log()).float()  # log q_t(y | x0) / q_t(x_t | x0)
    at_truth = loss.token_loss(true, x0, x_t, time)
    torch.testing.assert_close(at_truth, torch.zeros_like(at_truth), atol=2e-5, rtol=0)
    elsewhere = loss.token_loss(true.clamp(min=-5) + torch.randn(8, vocab), x0, x_t, time)
    assert (elsewhere > 1e-4).all()


def brute_force_matrices(loss, classes: int):
    """Q_t (K, K) for t = 1..T from the betas, and the products Qbar_t (Qbar_0 = I), by explicit matrix algebra."""
    abar = loss.abar
    mats, bars = [], [torch.eye(classes, dtype=torch.float64)]
    for t in range(1, loss.steps + 1):
        beta = 1 - abar[t] / abar[t - 1]
        if loss.graph == "absorbing":
            Q = (1 - beta) * torch.eye(classes, dtype=torch.float64)
            Q[:, loss.mask_id] += beta
            Q[loss.mask_id] = F.one_hot(torch.tensor(loss.mask_id), classes).double()
        else:
            Q = (1 - beta) * torch.eye(classes, dtype=torch.float64) + beta / classes
        mats.append(Q)
        bars.append(bars[-1] @ Q)
    return mats, bars


@pytest.mark.parametrize("graph,schedule", [("absorbing", "loglinear"), ("absorbing", "cosine"),
                                            ("uniform", "loglinear"), ("uniform", "cosine")])
def test_d3pm_posterior_equals_brute_force_bayes(graph, schedule):
    loss = OBJECTIVES["d3pm"].build(config_of("d3pm", diffusion_graph=graph, noise_schedule=schedule,
                                              diffusion_steps=6))
    K = V + (graph == "absorbing")
    mats, bars = brute_force_matrices(loss, K)
    torch.testing.assert_close(torch.stack([b.diagonal()[:V].min() for b in bars]) if graph == "uniform" else
                               torch.stack([b[0, 0] for b in bars]),
                               loss.abar + (1 - loss.abar) / K if graph == "uniform" else loss.abar)
    for t in range(2, loss.steps + 1):
        for x0 in range(V):
            for x_t in range(K):
                if bars[t][x0, x_t] == 0:
                    continue
                bayes = mats[t - 1][:, x_t] * bars[t - 1][x0] / bars[t][x0, x_t]  # (K,)
                ours = loss.posterior(F.one_hot(torch.tensor([x0]), K).double(), torch.tensor([x_t]),
                                      torch.tensor([t]), torch.tensor([t - 1]))[0]
                torch.testing.assert_close(ours, bayes)


def test_d3pm_absorbing_masks_with_probability_exactly_t_over_T():
    T = 10
    betas = 1 / (T - torch.arange(1, T + 1, dtype=torch.float64) + 1)
    torch.testing.assert_close(keep_probabilities("loglinear", T)[1:], torch.cumprod(1 - betas, 0))
    torch.testing.assert_close(keep_probabilities("loglinear", T), 1 - torch.arange(T + 1) / T, check_dtype=False)
    config = config_of("d3pm", vocab_size=50, diffusion_steps=T)
    x = torch.arange(200) % 50
    x_t, _, time = noised_rows("d3pm", config, x, 4000)
    steps = torch.round(time * T)
    assert set(steps.long().tolist()) == set(range(1, T + 1))
    masked = (x_t == 50).double().sum(-1)  # (B,)
    expected, var = 200 * steps / T, 200 * (steps / T) * (1 - steps / T)
    assert abs((masked - expected).sum().item()) < 4 * math.sqrt(var.sum().item())


@pytest.mark.parametrize("T,schedule", [(1, "loglinear"), (5, "loglinear"), (5, "cosine")])
def test_d3pm_bound_with_the_exact_posterior_denoiser_equals_minus_log_p(T, schedule):
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    loss = OBJECTIVES["d3pm"].build(config_of("d3pm", diffusion_steps=T, noise_schedule=schedule)).eval()
    mask = loss.mask_id
    for x0 in range(V):
        expected = 0.0
        for t in range(1, T + 1):
            keep = loss.abar[t].item()
            for x_t, prob in ((x0, keep), (mask, 1 - keep)):
                if prob == 0:
                    continue
                truth = p if x_t == mask else F.one_hot(torch.tensor(x0), V).double()  # q(x0 | x_t)
                logits = torch.cat([truth.log(), torch.tensor([float("-inf")], dtype=torch.float64)])[None]
                term = loss.token_loss(logits.float(), torch.tensor([x0]), torch.tensor([x_t]), torch.tensor([t / T]))
                expected += prob / T * term.item()
        assert expected == pytest.approx(-math.log(p[x0].item()), rel=1e-5)


def test_d3pm_perfect_denoiser_has_zero_kl_and_the_hybrid_term_is_for_training_only():
    loss = OBJECTIVES["d3pm"].build(config_of("d3pm", vocab_size=5, diffusion_steps=20))
    x0 = torch.tensor([0, 1, 2, 3, 4, 1])
    x_t = torch.tensor([5, 1, 5, 3, 5, 5])
    perfect = torch.where(F.one_hot(x0, 6).bool(), 30.0, -30.0)
    time = torch.tensor([3, 7, 12, 20, 1, 15]) / 20
    assert loss.eval().token_loss(perfect, x0, x_t, time).abs().max() < 1e-6
    rough = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    bound = loss.eval().token_loss(rough, x0, x_t, time)
    hybrid = loss.train().token_loss(rough, x0, x_t, time)
    torch.testing.assert_close(hybrid - bound, 0.01 * F.cross_entropy(rough, x0, reduction="none"))


# ---------------------------------------------------------------------------------------------- samplers


def oracle(objective: str, p: torch.Tensor, mask: int):
    """The exact denoiser of the toy distribution in each objective's output form."""
    def denoiser(x: torch.Tensor, t: float) -> torch.Tensor:
        logp = conditionals(p, x, mask).float()  # (B, L, V)
        if objective == "sedd":
            return logp + math.log(V)  # the scaled score of the absorbing graph
        if objective == "d3pm":
            return torch.cat([logp, torch.full_like(logp[..., :1], float("-inf"))], -1)
        return logp
    return denoiser


@pytest.mark.parametrize("objective,predictor", [("mdlm", None), ("sedd", "analytic"), ("d3pm", None)])
def test_samplers_with_an_oracle_denoiser_reproduce_the_distribution(objective, predictor):
    """Tokens that unmask in the same step are drawn independently: with 256 steps that rarely happens."""
    p, steps = toy_distribution(3), 256
    config = config_of(objective, diffusion_steps=steps) if objective == "d3pm" else config_of(objective)
    loss = OBJECTIVES[objective].build(config)
    if predictor:
        loss.predictor = predictor
    generator = torch.Generator().manual_seed(0)
    n = 6000
    x = loss.prior((n, L), generator, torch.device("cpu"))
    samples, _ = denoise_window(oracle(objective, p, config.vocab_size), loss, x, torch.zeros_like(x, dtype=torch.bool),
                                steps, generator, reuse_unchanged=objective == "mdlm")
    assert samples.max() < V
    counts = torch.stack([(samples == s).all(-1).sum() for s in SEQUENCES]).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < CHI2_999_DF26, chi2


@pytest.mark.parametrize("objective,predictor", [("mdlm", None), ("sedd", "euler"), ("sedd", "analytic"),
                                                 ("d3pm", None)])
def test_samplers_never_change_an_unmasked_token_and_leave_no_mask(objective, predictor):
    config = config_of(objective, vocab_size=9, diffusion_steps=12)
    if objective != "d3pm":
        config = config_of(objective, vocab_size=9)
    loss = OBJECTIVES[objective].build(config)
    if predictor:
        loss.predictor = predictor
    seen = []
    generator = torch.Generator().manual_seed(0)

    def random_model(x: torch.Tensor, t: float) -> torch.Tensor:
        seen.append(x.clone())
        return torch.randn(*x.shape, loss.output_columns, generator=generator) * 3

    x = loss.prior((4, 24), generator, torch.device("cpu"))
    fixed = torch.zeros_like(x, dtype=torch.bool)
    x[:, :3], fixed[:, :3] = 5, True  # a held prompt
    out, calls = denoise_window(random_model, loss, x, fixed, 12, generator, reuse_unchanged=False)
    assert calls == len(seen) >= 12 and (out[:, :3] == 5).all() and out.max() < 9
    history = torch.stack(seen + [out])  # (steps, B, T)
    for before, after in zip(history[:-1], history[1:]):
        unmasked = before != 9
        assert torch.equal(after[unmasked], before[unmasked])


@pytest.mark.parametrize("stride", [None, 1, 16])
def test_semi_autoregressive_sampling_gives_the_asked_length_after_each_prompt(stride):
    config, _ = parse(["--objective", "mdlm", "--vocab_size", "20", "--n_layer", "1", "--n_embd", "16", "--n_head",
                       "2", "--block_size", "16"])
    model = build_model(config).eval()
    prompts = [[3, 4, 5], [7]]
    outputs, calls = sample(model, prompts, 40, 4, torch.Generator().manual_seed(0), stride)
    assert [len(o) for o in outputs] == [40, 40] and all(0 <= t < 20 for o in outputs for t in o)
    assert calls >= 1 + math.ceil((40 - 13) / (stride or 8))  # a model call (at least) per window
    with pytest.raises(ConfigError, match="--stride=17 must be in"):
        sample(model, prompts, 4, 4, torch.Generator(), 17)
    with pytest.raises(ConfigError, match="--sampler=euler is not a sampler of objective=mdlm; use ddpm_cache"):
        sample(model, prompts, 4, 4, torch.Generator(), None, "euler")


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("flags,message", [
    (["--objective", "mdlm", "--diffusion_steps", "50"], "diffusion_steps=50 is read only by objective=d3pm"),
    (["--noise_schedule", "cosine"], "noise_schedule=cosine is read only by objective=mdlm/sedd/d3pm"),
    (["--objective", "d3pm", "--noise_schedule", "cosinesqr"], "d3pm has loglinear"),
    (["--objective", "sedd", "--time_conditioning", "False"], "sedd's scores depend on the noise level"),
    (["--no_antithetic_time"], "antithetic_time=False changes how diffusion times are drawn"),
    (["--objective", "mdlm", "--mtp", "sequential"], "mtp=sequential predicts further tokens to the right"),
    (["--objective", "mdlm", "--attn", "mamba"], "attn=mamba reads left to right only"),
    (["--objective", "mdlm", "--noise_eps", "0"], "noise_eps=0.0 must be in (0, 1)"),
])
def test_bad_diffusion_configs_are_refused_in_one_line(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(flags)


def test_the_diffusion_presets_validate_and_name_their_objective():
    for preset, objective in (("mdlm-tiny", "mdlm"), ("sedd-tiny", "sedd"), ("d3pm-tiny", "d3pm"), ("mdlm-owt", "mdlm")):
        model, _ = parse(["--preset", preset, "--vocab_size", "50257"])
        assert model.objective == objective
    model, _ = parse(["--preset", "mdlm-owt"])
    assert (model.n_layer, model.n_embd, model.block_size, model.tie_embeddings) == (12, 768, 1024, False)


@pytest.mark.parametrize("objective", ["mdlm", "sedd", "d3pm"])
def test_every_position_sees_the_whole_sequence_and_the_mask_row_exists(objective):
    config, _ = parse(["--objective", objective, "--vocab_size", "64", "--n_layer", "2", "--n_embd", "32",
                       "--n_head", "2", "--block_size", "16"])
    model = build_model(config).eval()
    assert model.tok_emb.weight.shape[0] == 128  # 64 data ids + [MASK] padded to the next multiple of 64
    x = torch.randint(0, 64, (1, 16))
    later = x.clone()
    later[0, -1] = 64  # the last token masked
    time = torch.tensor([0.5])
    assert not torch.allclose(model(x, time=time).logits[0, 0], model(later, time=time).logits[0, 0])
    assert (model.time_emb is None) == (objective == "mdlm")


def test_compiled_training_step_equals_eager():
    """The per-token terms recomputed chunk by chunk (checkpoint) under torch.compile; the three objectives share
    that path, so one of them (on CPU compiling takes tens of seconds)."""
    objective = "mdlm"
    config, train_config = parse(["--objective", objective, "--vocab_size", "40", "--n_layer", "1", "--n_embd", "32",
                                  "--n_head", "2", "--block_size", "16"])
    torch.manual_seed(0)
    model = build_model(config)
    batching = OBJECTIVES[objective].batching(None, train_config, config)
    x, y, time = batching(torch.randint(0, 40, (4, 16)), torch.rand(3, 4, 16))
    eager = model(x, y, time=time).loss
    eager_grad = torch.autograd.grad(eager, model.lm_head.weight)[0]
    compiled = torch.compile(model)(x, y, time=time).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(compiled, model.lm_head.weight)[0], eager_grad, rtol=1e-4,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------- end to end

SMALL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
         "--total_batch_size_str", "2*4*32", "--dropout", "0.1", "--learning_rate", "3e-3", "--warmup_steps", "2",
         "--log_interval", "1", "--eval_interval", "3", "--eval_iters", "2", "--max_iters", "6"]
KIND_FLAGS = {"mdlm": [], "sedd": ["--diffusion_graph", "uniform"], "d3pm": ["--diffusion_steps", "50"]}


def train_run(char_data, out, name: str, objective: str, *extra: str) -> dict[int, tuple]:
    argv = SMALL + ["--objective", objective, *KIND_FLAGS[objective], "--data_dir", str(char_data.parent),
                    "--out_dir", str(out), "--wandb_run_name", name, *extra]
    train(*parse(argv))
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: (m["loss"], m["grad_norm"], m.get("val_loss"), m.get("val_loss_se"), m.get("val_bpb"))
            for m in rows}


@pytest.mark.parametrize("objective", ["mdlm", "sedd", "d3pm"])
def test_training_resumes_bit_exactly_and_samples(char_data, tmp_path, objective, capsys):
    full = train_run(char_data, tmp_path, "full", objective)
    assert all(math.isfinite(v[0]) for v in full.values())
    _, _, val, se, bpb = full[5]
    assert val > 0 and se > 0 and bpb == pytest.approx(val / math.log(2), rel=1e-6)  # 1 byte per character
    assert "an upper bound on the NLL per token" in capsys.readouterr().out
    train_run(char_data, tmp_path, "first", objective, "--ckpt_interval", "3")
    resumed = train_run(char_data, tmp_path, "second", objective, "--resume",
                        str(tmp_path / "first/checkpoints/step_0000003"))
    assert sorted(resumed) == [3, 4, 5] and all(resumed[s] == full[s] for s in resumed), (resumed, full)

    sampler = ["--sampler", "analytic"] if objective == "sedd" else []
    sampled = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "full"), "--steps", "4",
                              "--max_new_tokens", "50", "--prompt", "ROMEO:", *sampler], capture_output=True,
                             text=True, cwd=REPO, timeout=300)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("--- sample 1\nROMEO:") or sampled.stdout.startswith("ROMEO:")
    assert "50 tokens in" in sampled.stderr and "4 steps per window" in sampled.stderr
    scored = eval_main(["data", "--ckpt", str(tmp_path / "full"), "--batches", "3", "--data_dir",
                        str(char_data.parent)])
    assert scored["objective"] == objective and scored["loss_se"] > 0 and scored["ppl_bound"] == math.exp(scored["loss"])
    assert "an upper bound on the NLL per token" in capsys.readouterr().out
    if objective != "mdlm":
        return  # the refusals below do not depend on the objective
    refused = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "full"), "--temperature", "0"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--temperature applies to left-to-right decoding" in refused.stderr
    judged = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "full"), "--steps", "2",
                             "--judge", str(tmp_path / "full")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert judged.returncode == 2 and "is bidirectional (objective=" in judged.stderr
