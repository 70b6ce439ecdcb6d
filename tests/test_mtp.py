"""Multi-token prediction (--mtp sequential / parallel): the loss against a direct reference, gradients, causality of
each depth, parameter counts, validation, training, resume, export, and greedy speculative decoding."""
import json

import pytest
import torch
import torch.nn.functional as F

import sample
from llm import export, speculative
from llm.cli import parse
from llm.config import ConfigError
from llm.generate import generate
from llm.model import LLM, build_model
from llm.speculative import SpeculativeStats, speculative_generate
from llm.targets import IGNORE
from llm.train import train
from tests.conftest import make_config
from tests.test_model import attention_params, mlp_params, model_params

MODES = ["sequential", "parallel"]
SPEC = dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity="swiglu", up_dim=40)


def mtp_config(mode: str, depths: int = 3, **fields):
    return make_config(SPEC, mtp=mode, n_mtp_tokens=depths, pos_emb="rope", norm="rms", **fields)


def reference_depth_states(model: LLM, idx: torch.Tensor) -> list[torch.Tensor]:
    """h¹..h^D straight from the definitions, position by position range: depth k at position t (t < T-k) reads
    h^(k-1)_t (sequential) or h⁰_t (parallel), and for sequential the embedding of token t+k."""
    T = idx.shape[1]
    h0, *_ = model.trunk(idx)  # (B, T, C)
    states, previous = [], h0
    for k, module in enumerate(model.mtp.depths, start=1):
        keep = T - k
        if keep <= 0:
            break
        if model.config.mtp == "sequential":
            hidden = module.norm_hidden(previous[:, :keep])
            embedded = module.norm_embedding(F.embedding(idx[:, k:k + keep], model.tok_emb.weight))
            x = torch.cat((hidden, embedded), dim=-1) @ module.proj.weight.T  # (B, T-k, C)
        else:
            x = h0[:, :keep]
        x = module.block(x, torch.arange(keep)[None])[0]  # (B, T-k, C)
        states.append(x)
        previous = x
    return states


def reference_losses(model: LLM, idx: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """Depth k's cross-entropy of its full logits at positions t < T-k against token t+k+1 = targets[t+k]."""
    losses = []
    for k, (module, h) in enumerate(zip(model.mtp.depths, reference_depth_states(model, idx)), start=1):
        logits = (module.norm_out(h) @ model.lm_head.weight.T)[..., :model.config.vocab_size]  # (B, T-k, V)
        wanted = targets[:, k:]  # (B, T-k)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), wanted.reshape(-1), ignore_index=IGNORE))
    return losses


@pytest.mark.parametrize("mode", MODES)
def test_losses_equal_the_reference_and_gradients_reach_every_parameter(mode):
    model = build_model(mtp_config(mode))
    B, T, V = 3, model.config.block_size, model.config.vocab_size
    idx, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    targets[0, 5:9] = IGNORE
    out = model(idx, targets)
    expected = reference_losses(model, idx, targets)
    assert sorted(out.stats) == ["mtp/loss_1", "mtp/loss_2", "mtp/loss_3"]
    for k, loss in enumerate(expected, start=1):
        torch.testing.assert_close(out.stats[f"mtp/loss_{k}"], loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, 0.1 * torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    plain = build_model(make_config(SPEC, pos_emb="rope", norm="rms"))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    torch.testing.assert_close(out.loss, plain(idx, targets).loss)  # the main loss is the main head's alone
    (out.loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert model(idx).logits.shape == (B, T, V) and model(idx).stats == {}  # without targets the modules stay idle


@pytest.mark.parametrize("mode", MODES)
def test_each_depth_sees_only_the_tokens_it_may(mode):
    """Depth k's prediction at t reads tokens <= t+k (sequential: the embedding of token t+k) or <= t (parallel),
    never later ones; the main logits stay causal."""
    model = build_model(mtp_config(mode)).eval()
    T, V, t = model.config.block_size, model.config.vocab_size, 10
    idx = torch.randint(0, V, (2, T))
    for k in (1, 2, 3):
        targets = torch.full((2, T), IGNORE)
        targets[:, t + k] = torch.randint(0, V, (2,))  # depth k's loss is its loss at position t alone

        def loss_after_changing(s: int) -> torch.Tensor:
            changed = idx.clone()
            changed[:, s] = (changed[:, s] + 1) % V
            with torch.no_grad():
                return model(changed, targets).stats[f"mtp/loss_{k}"]

        with torch.no_grad():
            base = model(idx, targets).stats[f"mtp/loss_{k}"]
        torch.testing.assert_close(loss_after_changing(t + k + 1), base, rtol=0, atol=1e-6)
        assert (loss_after_changing(t) - base).abs() > 1e-5
        reads_t_plus_k = (loss_after_changing(t + k) - base).abs() > 1e-5
        assert bool(reads_t_plus_k) == (mode == "sequential")
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(model(changed).logits[:, :t], model(idx).logits[:, :t], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count(mode, bias):
    config = mtp_config(mode, depths=2, bias=bias, tie_embeddings=False)
    C, b = config.n_embd, config.layers[-1]
    norm = C + (C if config.norm == "layer" and bias else 0)
    block = 2 * norm + attention_params(dict(attn="gqa", n_head=4, n_kv_heads=2), C, bias, rope=True)
    block += mlp_params(C, b.up_dim, gated=True, bias=bias)
    module = block + norm + ((2 * norm + 2 * C * C + bias * C) if mode == "sequential" else 0)
    trunk, _ = model_params(config)
    assert build_model(config).get_num_params() == (trunk + 2 * module, trunk + 2 * module)  # the head is shared


@pytest.mark.parametrize("fields,message", [
    (dict(mtp="sequential", n_mtp_tokens=0), "n_mtp_tokens=0 must be in [1, block_size=32) with mtp=sequential"),
    (dict(mtp="parallel", n_mtp_tokens=32), "n_mtp_tokens=32 must be in [1, block_size=32)"),
    (dict(mtp="sequential", mtp_lambda=-0.5), "mtp_lambda=-0.5 must be >= 0"),
    (dict(mtp="parallel", objective="mlm"), "mtp=parallel predicts further tokens to the right, but objective='mlm'"),
])
def test_validation_errors(fields, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make_config(**fields)


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit):
        parse(["--mtp", "both"])
    assert "mtp" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="n_mtp_tokens=0"):
        parse(["--mtp", "sequential", "--n_mtp_tokens", "0"])


def test_activation_recomputation_gives_identical_gradients():
    model = build_model(mtp_config("sequential", depths=2)).train()
    idx, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.act_recomp = recompute
        out = model(idx, targets)
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_moe_blocks_of_the_modules_add_their_balance_loss_and_move_their_bias():
    moe = dict(attn="gqa", n_head=4, n_kv_heads=2, ffn="moe", n_exp=6, n_shared=1, n_act=3, up_dim=32)
    model = build_model(make_config({**moe, "aux_free": True, "gamma": 0.1}, mtp="sequential", n_mtp_tokens=2))
    idx, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    out = model(idx, targets)
    assert len(out.layer_stats) == 2 + 2 and all("load" in stats for stats in out.layer_stats)
    routers = [block.ffn.router for block in model.mtp.blocks()]
    assert all(router.expert_bias.abs().sum() == 0 for router in routers)
    model.after_step(out.layer_stats)
    assert all(router.expert_bias.abs().sum() > 0 for router in routers)
    without_bias_loss = build_model(make_config(moe, mtp="parallel", n_mtp_tokens=1))
    out = without_bias_loss(idx, targets)
    trunk_aux = without_bias_loss.trunk(idx)[1]
    assert out.aux_loss - 0.1 * out.stats["mtp/loss_1"] - trunk_aux > 1e-4  # the module's Switch loss is in aux_loss


TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
        "--total_batch_size_str", "4*32", "--log_interval", "1", "--max_iters", "6", "--warmup_steps", "1",
        "--eval", "--eval_interval", "3", "--eval_iters", "2"]


def train_run(char_data, tmp_path, name: str, *extra: str) -> list[dict]:
    argv = TINY + ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--wandb_run_name", name, *extra]
    train(*parse(argv))
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", MODES)
def test_training_logs_each_depth_and_resumes_exactly(char_data, tmp_path, mode):
    flags = ["--mtp", mode, "--n_mtp_tokens", "2", "--save_model", "--ckpt_interval", "3"]
    full = train_run(char_data, tmp_path, "full", *flags)
    assert all({"mtp/loss_1", "mtp/loss_2", "aux_loss"} <= set(row) for row in full)
    assert all(row["aux_loss"] == pytest.approx(0.1 * (row["mtp/loss_1"] + row["mtp/loss_2"]) / 2, rel=1e-4)
               for row in full)
    resumed = train_run(char_data, tmp_path, "again", *flags, "--resume",
                        str(tmp_path / "full" / "checkpoints" / "step_0000003"))
    figures = ("loss", "mtp/loss_1", "mtp/loss_2", "grad_norm")
    assert [[row[f] for f in figures] for row in resumed] == [[row[f] for f in figures] for row in full[3:]]


def test_export_leaves_the_modules_out_and_matches_our_logits(char_data, tmp_path, capsys):
    train_run(char_data, tmp_path, "run", "--mtp", "sequential", "--save_model", "--max_iters", "1")
    export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert "note: the head add-on 'mtp' is training-only and is left out of the export" in capsys.readouterr().out
    import transformers

    from llm.checkpoint import load_trained

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, ours, _ = load_trained(str(tmp_path / "run"))
    idx = torch.randint(0, ours.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx).logits, rtol=1e-4, atol=1e-4)
    assert not any("mtp" in name for name in hf.state_dict())


@pytest.fixture(scope="module")
def drafting_model(char_data) -> LLM:
    """A tiny sequential-MTP model trained briefly on Tiny Shakespeare, so that some of its drafts are accepted."""
    torch.manual_seed(0)
    model = build_model(make_config(SPEC, mtp="sequential", n_mtp_tokens=3, pos_emb="rope", norm="rms", vocab_size=65,
                            block_size=24, n_layer=1, n_embd=48))
    data = torch.from_numpy(__import__("numpy").fromfile(char_data / "train.bin", dtype="uint16").astype("int64"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 25, (16,))
        window = torch.stack([data[s:s + 25] for s in starts.tolist()])  # (16, 25)
        out = model(window[:, :-1], window[:, 1:])
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def check_draft_states(monkeypatch, model: LLM) -> list[int]:
    """Before every round, each module's cached hidden states equal the reference over the committed tokens;
    returns each round's cached lengths (summed over the depths)."""
    lengths, draft = [], speculative.Drafter.draft

    def checked(self, tokens, count):
        states = reference_depth_states(model, torch.tensor([tokens]))
        for k, (cache, state) in enumerate(zip(self.caches, states), start=1):
            L = cache.length
            assert L <= len(tokens) - k  # only positions whose tokens are all committed
            torch.testing.assert_close(self.hidden[k][:, :L], state[:, :L], rtol=1e-4, atol=1e-5)
        lengths.append(sum(cache.length for cache in self.caches))
        return draft(self, tokens, count)

    monkeypatch.setattr(speculative.Drafter, "draft", checked)
    return lengths


@pytest.mark.parametrize("prompt_length", [1, 5, 18, 23, 24])
def test_speculative_decoding_equals_greedy_decoding(drafting_model, monkeypatch, prompt_length):
    """Several prompts, up to block_size (24) long, decoded past block_size: the same tokens and, for each token,
    the same logits as plain greedy decoding; some drafts are accepted and some rejected."""
    prompts = [torch.randint(0, 65, (prompt_length,)).tolist() for _ in range(3)]
    lengths = check_draft_states(monkeypatch, drafting_model)
    stats, plain_logits, fast_logits = SpeculativeStats(), [], []
    plain = generate(drafting_model, prompts, 40, temperature=0, on_step=lambda l, new: plain_logits.append(l))
    fast = speculative_generate(drafting_model, prompts, 40, stats=stats, on_step=lambda l, new: fast_logits.append(l))
    assert fast == plain
    assert len(fast_logits) == 3 * 40
    for i, logits in enumerate(fast_logits):
        torch.testing.assert_close(logits, plain_logits[i % 40][i // 40:i // 40 + 1], rtol=1e-4, atol=1e-4)
    if prompt_length < 18:
        assert 0 < stats.accepted < stats.drafted and max(lengths) > 0


def test_speculative_decoding_stops_at_end_of_text(drafting_model):
    prompt = [1, 2, 3]
    plain = generate(drafting_model, [prompt], 30, temperature=0)[0]
    eot = plain[7]
    stopped = speculative_generate(drafting_model, [prompt], 30, eot=eot)[0]
    assert stopped == plain[:plain.index(eot)]
    assert speculative_generate(drafting_model, [prompt], 5)[0] == plain[:5]


@pytest.mark.parametrize("layers,fields", [
    pytest.param([SPEC, {**SPEC, "mod": True, "capacity": 0.5}], {}, id="mixture-of-depths"),
    pytest.param([SPEC] * 3, dict(arch="recurrent", n_prelude=1, n_core=1, n_coda=1, eval_recurrence=2),
                 id="recurrent-depth"),
])
def test_speculative_decoding_rolls_back_routed_and_recurrent_caches(layers, fields):
    """Untrained modules draft badly, so most rounds reject drafts and roll every cache back (a routed layer's
    flags and its mixer's keys; each core iteration's caches): the tokens still equal greedy decoding."""
    torch.manual_seed(0)
    model = build_model(make_config(layers, mtp="sequential", n_mtp_tokens=2, pos_emb="rope", norm="rms", block_size=32,
                            **fields)).eval()
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (3, 9)]
    stats = SpeculativeStats()
    assert speculative_generate(model, prompts, 20, stats=stats) == generate(model, prompts, 20, temperature=0)
    assert stats.drafted > stats.accepted


def test_speculative_is_refused_without_sequential_modules():
    with pytest.raises(ConfigError, match="the checkpoint has mtp=parallel; train with --mtp sequential"):
        speculative_generate(build_model(mtp_config("parallel")), [[1, 2]], 3)


@pytest.fixture(scope="module")
def sequential_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("spec")
    train_run(char_data, out, "run", "--mtp", "sequential", "--save_model", "--max_iters", "2", "--no_eval")
    return out / "run"


def test_sample_py_speculative(sequential_run, capsys):
    argv = ["--ckpt", str(sequential_run), "--prompt", "ROMEO:", "--temperature", "0", "--max_new_tokens", "20"]
    sample.main(argv)
    plain = capsys.readouterr().out
    sample.main(argv + ["--speculative"])
    captured = capsys.readouterr()
    assert captured.out == plain and "drafts accepted" in captured.err


@pytest.mark.parametrize("extra,message", [
    ([], "--speculative decodes greedily with the cache; pass --temperature 0 (got 0.8)"),
    (["--temperature", "0", "--no_cache"], "and drop --no_cache"),
])
def test_sample_py_speculative_refusals(sequential_run, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(sequential_run), "--speculative", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
