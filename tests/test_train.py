"""Tiny end-to-end training runs and the trainer's start-up checks."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llm.cli import parse
from llm.config import ConfigError, run_dir_name
from llm.model import LLM, build_model
from llm.train import train
from tests.conftest import REPO, make_config


def test_first_run_prepares_the_default_dataset_offline(tmp_path):
    """README's `python train.py` in a folder without data/: the shipped text becomes data/shakespeare_char."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--max_iters", "2", "--log_interval", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "data/shakespeare_char was missing: prepared shakespeare_char from the Tiny Shakespeare text " \
                       "shipped with llm"
    meta = json.loads((tmp_path / "data" / "shakespeare_char" / "meta.json").read_text())
    assert (meta["vocab_size"], meta["train_tokens"] + meta["val_tokens"]) == (65, 1_115_394)
    assert [json.loads(row)["step"] for row in (tmp_path / "out" / "run" / "metrics.jsonl").open()] == [0, 1]


def test_missing_dataset_names_the_prepare_command(tmp_path):
    model, cfg = parse(["--data_dir", str(tmp_path), "--out_dir", str(tmp_path), "--dataset", "shakespeare"])
    with pytest.raises(ConfigError, match="python -m llm.data.prepare shakespeare --out"):
        train(model, cfg)
    model, cfg = parse(["--data_dir", str(tmp_path), "--out_dir", str(tmp_path), "--dataset", "genomic"])
    with pytest.raises(ConfigError, match="python -m llm.data.prepare genomic --source PATH_TO_YOUR_FILES --out"):
        train(model, cfg)
    model, cfg = parse(["--data_dir", str(tmp_path), "--out_dir", str(tmp_path), "--dataset", "mine"])
    with pytest.raises(ConfigError, match="python -m llm.data.prepare text --source PATH_TO_YOUR_FILES --out"):
        train(model, cfg)


def test_vocab_smaller_than_data_is_refused(char_data, tmp_path):
    model, cfg = parse(["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--vocab_size", "50"])
    with pytest.raises(ConfigError, match="vocab_size=50 is smaller than dataset 'shakespeare_char'.s largest token id 64"):
        train(model, cfg)


def test_tiny_run_loss_falls(char_data, tmp_path):
    argv = ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "40", "--log_interval", "39",
            "--batch_size", "8", "--block_size", "64", "--total_batch_size_str", "2*8*64", "--learning_rate", "3e-3",
            "--warmup_steps", "5", "--eval", "--eval_iters", "4", "--eval_interval", "39", "--save_model",
            "--wandb_run_name", "trial_run_w/o_mix", "--attn", "gqa", "--n_kv_heads", "2", "--pos_emb", "rope"]
    metrics = train(*parse(argv))
    assert metrics["step"] == 39 and metrics["val_loss"] < 3.0  # ln(65) = 4.17 at init
    run = tmp_path / "trial_run_w_o_mix"
    assert (run / "checkpoints" / "step_0000040" / "llm.safetensors").is_file()
    assert [json.loads(row)["step"] for row in (run / "metrics.jsonl").open()] == [0, 38, 39]  # 38: evaluated
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == 65


def test_example_moe_stack_trains_and_updates_the_bias_once_per_step(char_data, tmp_path, monkeypatch):
    updates = []
    update = LLM.after_step
    monkeypatch.setattr(LLM, "after_step", lambda self, layer_stats: updates.append(
        [stats["load"].clone() for stats in layer_stats if stats]) or update(self, layer_stats))
    argv = ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--layer_configs_jsonl",
            str(REPO / "layer_configs.jsonl"), "--pos_emb", "rope", "--norm", "rms", "--max_iters", "6",
            "--batch_size", "4", "--block_size", "32", "--total_batch_size_str", "2*4*32", "--log_interval", "5",
            "--eval", "--eval_iters", "2", "--eval_interval", "5", "--save_model"]
    metrics = train(*parse(argv))
    assert len(updates) == 6  # once per optimizer step: not per micro-step, not during evaluation
    assert all(load.sum().item() == 2 * 4 * 32 * 2 for loads in updates for load in loads)  # 2 micro-steps, top-2
    assert metrics["val_loss"] < 4.0 and metrics["aux_loss"] > 0
    assert len(metrics["load_fractions/layer1"]) == 7 and metrics["max_load_ratio"] >= 1.0
    assert "max_load_ratio/layer2" not in metrics  # layer 2 is dense
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_0000006" / "llm.safetensors")
    gamma = 0.001  # layer 1 of layer_configs.jsonl is aux-free; layer 0 balances with the loss and has no bias
    expected = sum(gamma * torch.sign(loads[1].float().mean() - loads[1].float()) for loads in updates)
    torch.testing.assert_close(saved["blocks.1.ffn.router.expert_bias"], expected)
    assert "blocks.0.ffn.router.expert_bias" not in saved


def test_run_dir_name_is_path_safe_and_never_empty():
    assert run_dir_name("trial_run_w/o_mix") == "trial_run_w_o_mix"
    for empty in ("", "..", "../..", "/", " "):
        with pytest.raises(ConfigError, match=f"wandb_run_name={empty!r} names no directory"):
            run_dir_name(empty)


def test_activation_recomputation_gives_identical_gradients():
    config = make_config([dict(attn="mla", n_head=4, kv_latent_dim=16, rope_head_dim=8), dict(attn="gqa", n_head=4, n_kv_heads=2)],
                         pos_emb="rope")
    model = build_model(config)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.act_recomp = recompute
        model(idx, idx).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)


def test_failed_write_leaves_previous_file(tmp_path):
    from llm.files import write_atomically

    path = tmp_path / "weights.bin"
    write_atomically(path, lambda tmp: tmp.write_bytes(b"old"))

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(path, crash)
    assert path.read_bytes() == b"old"


def test_training_functions_stay_short():
    """The loop delegates: no function in llm/train/ grows past 60 lines."""
    import ast

    for path in (REPO / "llm" / "train").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} has {length} lines"


def test_the_eta_is_smoothed_and_drops_the_first_interval():
    from llm.train.metrics import StepClock

    clock = StepClock()
    assert clock.update(10.0) == 10.0  # the only figure so far: compilation included
    assert clock.update(1.0) == 1.0  # the first interval is dropped
    assert clock.update(2.0) == pytest.approx(1.3)
    assert clock.update(1.0) == pytest.approx(1.21)
