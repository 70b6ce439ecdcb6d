"""The preflight estimate: exact parameter counts from a model of fake tensors, memory per device against what a
training step measures on this CPU, `--estimate`, and the refusal of a run that cannot fit."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from llm.cli import parse
from llm.config import ConfigError
from llm.model import build_model
from llm.train import preflight
from llm.train.preflight import estimate
from tests.conftest import REPO

# A measured peak (resident memory gained by a two-step run, freed blocks returned at once) over the estimate stays
# within these bounds on CPU: the estimate is an upper bound on the tensors' memory (0.78 to 0.88 measured here).
MEASURED_OVER_ESTIMATE = (0.7, 1.2)
MEASURE = """
import json, resource, sys
from llm.cli import parse
from llm.train import preflight
from llm.train.loop import train
from llm.train.metrics import peak_memory_bytes
import torch
model, cfg = parse(sys.argv[1:])
e = preflight.estimate(preflight.estimate_vocab(model, cfg), cfg, 1, preflight.planned_run(cfg)[1])
base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
train(model, cfg)
peak = peak_memory_bytes(torch.device("cpu"))  # this process's own peak (ru_maxrss keeps its launcher's too)
print(json.dumps({"estimate": e.total, "measured": peak - base}))
"""
SHAPE = ["--n_layer", "4", "--n_embd", "384", "--n_head", "6", "--block_size", "256", "--batch_size", "8"]


def run_train_py(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.parametrize("extra", [[], ["--act_recomp"], ["--ffn", "moe", "--n_exp", "4", "--up_dim", "1024"]],
                         ids=["dense", "recomputed", "moe"])
def test_the_estimate_is_close_to_the_measured_peak_on_cpu(extra, char_data, tmp_path):
    args = [*SHAPE, *extra, "--max_iters", "2", "--device", "cpu", "--no_save_model", "--no_eval", "--data_dir",
            str(char_data.parent), "--out_dir", str(tmp_path)]
    # glibc keeps freed heap memory for reuse, so a process's peak resident memory depends on how earlier
    # allocations fragmented it; serving every block of 64 KiB or more by mmap (returned to the system when freed)
    # makes it follow the tensors alive at each moment, which is what the estimate counts.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.splitlines()[-1])
    ratio = figures["measured"] / figures["estimate"]
    assert MEASURED_OVER_ESTIMATE[0] <= ratio <= MEASURED_OVER_ESTIMATE[1], figures


@pytest.mark.parametrize("argv", [[], ["--ffn", "moe"], ["--ffn", "peer", "--num_experts", "4096", "--product_key_dim",
                                                         "64", "64"], ["--attn", "mamba"],
                                  ["--preset", "ngpt"],
                                  ["--mtp", "sequential"]], ids=str)
def test_parameter_counts_are_exact(argv, char_data):
    model_config, cfg = parse([*argv, "--data_dir", str(char_data.parent)])
    model_config = preflight.estimate_vocab(model_config, cfg)
    assert estimate(model_config, cfg, 1, torch.float32).params == build_model(model_config).get_num_params()


def test_recomputation_sharding_precision_and_muon_shrink_their_parts(char_data):
    model_config, cfg = parse(["--data_dir", str(char_data.parent)])
    model_config = preflight.estimate_vocab(model_config, cfg)
    base = estimate(model_config, cfg, 1, torch.float32)
    recomputed = estimate(model_config, dataclasses.replace(cfg, act_recomp=True), 1, torch.float32)
    assert recomputed.activations < base.activations and recomputed.weights == base.weights
    sharded = estimate(model_config, dataclasses.replace(cfg, dist="fsdp"), 4, torch.float32)
    assert sharded.weights == base.weights // 4 and sharded.optimizer == base.optimizer // 4 and sharded.extra > 0
    assert estimate(model_config, cfg, 4, torch.float32).extra == base.weights  # DDP's gradient buckets
    assert estimate(model_config, cfg, 1, torch.bfloat16).activations < base.activations
    muon = estimate(model_config, dataclasses.replace(cfg, optimizer="muon"), 1, torch.float32)
    assert muon.optimizer < base.optimizer
    half = estimate(model_config, dataclasses.replace(cfg, batch_size=cfg.batch_size // 2), 1, torch.float32)
    assert 1.9 < base.activations / half.activations <= 2


def test_estimate_prints_and_exits_without_training(tmp_path, char_data):
    result = run_train_py(["--estimate", "--data_dir", str(char_data.parent), "--out_dir", str(tmp_path / "out")],
                          tmp_path)
    assert result.returncode == 0, result.stderr
    first, verdict = result.stdout.splitlines()[-2:]
    model_config, cfg = parse(["--data_dir", str(char_data.parent)])
    total, active = build_model(preflight.estimate_vocab(model_config, cfg)).get_num_params()
    assert first.startswith(f"estimate: {total:,} parameters ({active:,} active); per device")
    assert verdict.startswith("fits: ")
    assert not (tmp_path / "out").exists()


def test_estimate_for_a_gpu_preset_on_a_machine_without_one(tmp_path):
    """A preset for many GPUs is estimated on a laptop: sharded over --ranks, in bf16, its data not prepared."""
    result = run_train_py(["--preset", "llama3-8b-genomic", "--device", "cuda", "--dist", "fsdp", "--act_recomp",
                           "--ranks", "8", "--estimate", "--data_dir", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bfloat16, recomputed" in result.stdout
    assert "per device on each of 8 ranks (fsdp)" in result.stdout
    if not torch.cuda.is_available():
        assert result.stdout.splitlines()[-1] == "no such device here to compare with"


def test_ranks_applies_to_the_estimate_only():
    with pytest.raises(ConfigError, match="--ranks 2 applies to --estimate only"):
        parse(["--ranks", "2"])


def test_a_run_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path, char_data):
    """docs/configuration.md's llm720 example (16 B parameters, a million PEER experts per layer) on this machine."""
    config = tmp_path / "llm720.yaml"
    config.write_text(
        "model_config: {hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072,\n"
        "  use_peer: true, peer_start_layer: 2, peer_config: {num_experts: 1048576, product_key_dim: [1024, 1024]},\n"
        "  mla_config: {q_lora_rank: 192, kv_lora_rank: 64, qk_rope_head_dim: 64, v_head_dim: 64, "
        "qk_nope_head_dim: 64}}\n"
        "train_config: {per_device_train_batch_size: 16, gradient_accumulation_steps: 4, max_steps: 10,\n"
        "  lr_scheduler_type: cosine, bf16: true}\n")
    result = run_train_py(["--config", str(config), "--device", "cpu", "--data_dir", str(char_data.parent),
                           "--out_dir", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 2
    assert "estimate: 16,153,501,952 parameters" in result.stdout
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: the run needs an estimated ") and "--no_memory_check" in error[0]


def test_the_refusal_names_the_figures_and_no_memory_check_starts_anyway(monkeypatch, tmp_path, char_data):
    from llm.train import train

    monkeypatch.setattr(preflight, "device_memory", lambda device: (2**20, "a 1 MiB test device"))
    model_config, cfg = parse(["--max_iters", "1", "--data_dir", str(char_data.parent), "--out_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"but has 1.0 MiB \(a 1 MiB test device\); lower --batch_size"):
        train(model_config, cfg)
    train(model_config, dataclasses.replace(cfg, memory_check=False, overwrite=True))


def test_a_model_that_does_not_run_on_fake_tensors_trains_without_an_estimate(monkeypatch, capsys, tmp_path,
                                                                               char_data):
    from llm.train import train

    def data_dependent(*args):
        raise RuntimeError("aten.nonzero has a data-dependent output shape\nmore detail")

    monkeypatch.setattr(preflight, "estimate", data_dependent)
    model_config, cfg = parse(["--max_iters", "1", "--data_dir", str(char_data.parent), "--out_dir", str(tmp_path)])
    train(model_config, cfg)
    assert ("estimate: not available, the model's forward pass does not run on fake tensors (aten.nonzero has a "
            "data-dependent output shape); memory is not checked") in capsys.readouterr().out
