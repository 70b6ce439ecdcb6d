"""The model level is open: an architecture kind and an objective kind defined in this file (outside the package)
train through train.py's entry point, resume bit-exactly, reload from their checkpoint, and sample, export,
evaluate and report through the commands' --import flag.

Importing this module registers both kinds, so `--import tests.test_model_level` brings them to a command."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train as train_entry
from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import ConfigError, LLMconfig, Trainconfig, require
from llm.hf import family
from llm.model import ARCHS, LLM, register_arch
from llm.model.kinds import ArchKind, ObjectiveKind
from llm.model.objectives.token_loss import TokenLoss
from llm.model.registry import OBJECTIVES, register_objective
from llm.targets import IGNORE, LabelRules
from tests.conftest import REPO

# ---------------------------------------------------------------- a toy architecture: two stacks and a learned gate


class GatedStacks(LLM):
    """The first half of the layers and the second half each run over the embedded tokens; a learned per-channel
    gate g mixes their outputs: h = sigmoid(g) * A(x) + (1 - sigmoid(g)) * B(x)."""

    arch = "gated_stacks"

    def add_modules(self) -> None:
        self.gate = nn.Parameter(torch.zeros(self.config.n_embd))  # (C,) starts at an even mix

    def run_blocks(self, run_block, x, cache):
        half = len(self.blocks) // 2
        outputs, aux_loss, layer_stats = [], x.new_zeros((), dtype=torch.float32), []
        for stack in (range(half), range(half, len(self.blocks))):
            h = x  # (B, T, C)
            for i in stack:
                h, aux, stats = run_block(i, h, None if cache is None else cache.layers[i])
                aux_loss, layer_stats = aux_loss + aux, layer_stats + [stats]
            outputs.append(h)
        g = torch.sigmoid(self.gate).to(x.dtype)  # (C,)
        return g * outputs[0] + (1 - g) * outputs[1], aux_loss, layer_stats, {"toy/gate": g.mean().detach()}


def check_gated_stacks(config: LLMconfig) -> None:
    require(config.n_layer % 2 == 0, f"arch=gated_stacks splits the layers into two stacks, but n_layer="
                                     f"{config.n_layer} is odd; pass an even --n_layer")


GATED_STACKS = ArchKind("gated_stacks", GatedStacks, check_gated_stacks,
                        export_refusal="arch=gated_stacks (two gated stacks); no transformers family has them")

# ---------------------------------------------------------------- a toy objective: noisy inputs, weighted positions


class NoisyNextToken:
    """Next-token batching whose inputs are corrupted: each input token is, with probability 0.2, replaced by the
    token at a uniformly drawn position of its row; the targets stay the clean next tokens, and position t of T
    weighs 2 (t + 1) / (T + 1) in the loss (mean 1: tokens with more context count more)."""

    extra_tokens = 1
    draws = 2

    def __init__(self, rules: LabelRules | None):
        self.table = None if rules is None else rules.table

    def __call__(self, rows: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        corrupt, where = uniforms[:, :, :-1]  # (B, T) each
        x = rows[:, :-1]  # (B, T)
        swapped = x.gather(1, (where * x.shape[1]).long())  # (B, T) a token from elsewhere in the row
        y = rows[:, 1:] if self.table is None else self.table[rows[:, 1:]]  # (B, T)
        T = x.shape[1]
        weights = (2 * torch.arange(1, T + 1) / (T + 1)).expand_as(x)  # (B, T)
        return torch.where(corrupt < 0.2, swapped, x), y, weights


NOISY_CLM = ObjectiveKind("noisy_clm", TokenLoss, lambda rules, train, config: NoisyNextToken(rules))

register_arch(GATED_STACKS)
register_objective(NOISY_CLM)

# ---------------------------------------------------------------- the tests

FLAGS = ["--arch", "gated_stacks", "--objective", "noisy_clm", "--n_layer", "4", "--n_embd", "32", "--n_head", "2",
         "--block_size", "32", "--batch_size", "4", "--total_batch_size_str", "2*4*32", "--learning_rate", "3e-3",
         "--warmup_steps", "2", "--max_iters", "8", "--log_interval", "1", "--eval", "--eval_interval", "4",
         "--eval_iters", "2", "--save_model", "--dropout", "0.1"]


def train_run(char_data, out, name: str, *extra: str) -> dict[int, dict]:
    train_entry.main(FLAGS + ["--data_dir", str(char_data.parent), "--out_dir", str(out), "--wandb_run_name", name,
                              *extra])
    return {row["step"]: row for row in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines())}


def command(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_toy_architecture_and_objective_train_resume_reload_and_run_every_command(char_data, tmp_path):
    full = train_run(char_data, tmp_path, "full")
    assert full[7]["loss"] < full[0]["loss"] and 0 < full[7]["toy/gate"] < 1
    assert "val_loss" in full[7] and full[7]["flops_per_token"] > 0

    train_run(char_data, tmp_path, "first", "--max_iters", "8", "--ckpt_interval", "3")
    resumed = train_run(char_data, tmp_path, "second", "--resume", str(tmp_path / "first/checkpoints/step_0000003"))
    assert sorted(resumed) == list(range(3, 8))
    for step, row in resumed.items():  # the same batches, corruption, dropout and updates as without the stop
        assert (row["loss"], row["grad_norm"], row.get("val_loss")) == \
            (full[step]["loss"], full[step]["grad_norm"], full[step].get("val_loss"))

    _, model, _ = load_trained(str(tmp_path / "full"))  # rebuilt from config.json with the registered kinds
    assert type(model) is GatedStacks and type(model.objective) is TokenLoss
    assert model.gate.abs().sum() > 0  # trained, and loaded

    run = str(tmp_path / "full")
    unknown = command("sample.py", "--ckpt", run, "--max_new_tokens", "4")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "objective='noisy_clm' is not a registered kind" in unknown.stderr and "--import MODULE" in unknown.stderr
    sampled = command("sample.py", "--ckpt", run, "--import", "tests.test_model_level", "--max_new_tokens", "8",
                      "--temperature", "0")
    assert sampled.returncode == 0, sampled.stderr
    exported = command("-m", "llm.export", "--ckpt", run, "--out", str(tmp_path / "hf"), "--import",
                       "tests.test_model_level")
    assert exported.returncode == 2 and exported.stderr.startswith("error: cannot export: objective='noisy_clm'")
    (tmp_path / "seq.fa").write_text(">one\nACGTTGCAACGTACGATTACA\n>two\nGATTACAGATTACACCGT\n")
    evaluated = command("-m", "llm.eval", "fasta", "--ckpt", run, "--fasta", str(tmp_path / "seq.fa"), "--import",
                        "tests.test_model_level")
    assert evaluated.returncode == 0 and "2 sequences" in evaluated.stdout, evaluated.stderr
    reported = command("-m", "llm.report", run, "--out", str(tmp_path / "report"), "--import", "tests.test_model_level")
    assert reported.returncode == 0 and "| full |" in reported.stdout, reported.stderr


def test_toy_kinds_check_their_configs_and_batches():
    with pytest.raises(ConfigError, match="^arch=gated_stacks splits the layers into two stacks, but n_layer=3 is odd"):
        parse(["--arch", "gated_stacks", "--n_layer", "3"])
    with pytest.raises(ConfigError, match=r"^cannot export: arch=gated_stacks \(two gated stacks\)"):
        family(parse(["--arch", "gated_stacks", "--n_layer", "2"])[0])
    batching = OBJECTIVES["noisy_clm"].batching(None, Trainconfig(), LLMconfig())
    rows = torch.arange(2 * 9).view(2, 9)  # (B, R): distinct tokens
    uniforms = torch.rand(2, 2, 9, generator=torch.Generator().manual_seed(0))
    x, y, weights = batching(rows, uniforms)
    assert torch.equal(y, rows[:, 1:]) and weights.mean() == 1 and weights[0, -1] > weights[0, 0]
    kept = uniforms[0, :, :-1] >= 0.2  # (B, T)
    assert torch.equal(x[kept], rows[:, :-1][kept]) and not kept.all()
    assert (x // 9 == torch.arange(2)[:, None]).all()  # a corrupted input comes from its own row


def test_the_token_weights_multiply_each_targets_term_chunked_or_not():
    config = parse(FLAGS + ["--vocab_size", "50", "--dropout", "0"])[0]
    model = ARCHS["gated_stacks"].build(config)
    idx, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    targets[0, :3] = IGNORE
    weights = torch.rand(2, 12)
    chunked = model(idx, targets, token_weights=weights)  # the chunked cross-entropy, no logits
    full = model(idx, targets, return_logits=True, token_weights=weights)
    per_token = F.cross_entropy(full.logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    expected = (per_token * weights).sum() / (targets != IGNORE).sum()
    torch.testing.assert_close(chunked.loss, expected)
    torch.testing.assert_close(full.loss, expected)
    grads = torch.autograd.grad(chunked.loss, model.gate)[0]
    torch.testing.assert_close(grads, torch.autograd.grad(expected, model.gate)[0])


def test_the_toy_architecture_is_causal_and_its_cache_equals_the_full_forward():
    config = parse(FLAGS + ["--vocab_size", "50", "--dropout", "0"])[0]
    model = ARCHS["gated_stacks"].build(config).eval()
    with torch.no_grad():
        model.gate.normal_()
        idx = torch.randint(0, 50, (2, 12))
        full = model(idx).logits  # (B, T, V)
        changed = idx.clone()
        changed[:, 7] = (changed[:, 7] + 1) % 50
        assert torch.equal(model(changed).logits[:, :7], full[:, :7])
        cache = model.new_cache(2)
        stepped = torch.cat([model(idx[:, :5], cache=cache).logits] +
                            [model(idx[:, t:t + 1], cache=cache).logits for t in range(5, 12)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
