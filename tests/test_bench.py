"""The training-step benchmark and the MFU estimate."""
import json

import pytest
import torch

from llm import bench
from llm.config import exit_on_user_error
from llm.model import build_model
from llm.train import mfu
from tests.conftest import make_config


def test_benchmark_reports_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = bench.main(["--moe", "--n_layer", "1", "--steps", "2", "--warmup=1", "--json", str(path),
                         "--batch_size", "2", "--block_size", "16", "--total_batch_size_str", "32"])
    assert result["tokens_per_step"] == 32 and result["tokens_per_s"] > 0 and result["peak_memory_bytes"] > 0
    assert result["active_params"] < result["params"] and result["mfu"] is None  # no peak known for a CPU
    written = json.loads(path.read_text())
    assert written["tokens_per_s"] == result["tokens_per_s"] and written["config"]["model"]["layers"][0]["ffn"] == "moe"


def test_split_argv_takes_only_its_own_flags():
    own, rest = bench.split_argv(["--steps", "3", "--moe", "--json=x.json", "--n_layer", "2"], {"steps", "json"})
    assert own == ["--steps", "3", "--json=x.json"] and rest == ["--moe", "--n_layer", "2"]


def test_bad_steps_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        bench.main(["--steps", "0"])
    assert exit_info.value.code == 2 and "--steps=0 must be >= 1" in capsys.readouterr().err


def flops(config) -> tuple[float, int]:
    """(the model's training FLOPs per token, its active parameters)."""
    model = build_model(config)
    return model.flops_per_token(), model.get_num_params()[1]


def test_mfu_uses_the_palm_formula_and_the_peak_table(monkeypatch):
    per_token, active = flops(make_config(n_layer=2, n_embd=48, block_size=32))
    assert per_token == 6 * active + 12 * 2 * 48 * 32
    assert mfu.mfu(1e6, per_token, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert mfu.mfu(1e6, per_token, torch.device("cuda")) == pytest.approx(1e6 * per_token / 989e12)


def mixing(config) -> float:
    """FLOPs per token beyond 6 * the active parameters."""
    per_token, active = flops(config)
    return per_token - 6 * active


def test_flops_per_token_counts_each_layers_own_mixing():
    """Attention over its keys (a window's when set), MLA's separate head widths, NSA's three branches' keys, the
    Mamba scan, Hyena's FFT convolutions, and a stack summing its layers' kinds."""
    T, C = 32, 48
    full = 12 * C * T
    assert mixing(make_config(dict(window=8))) == 2 * 12 * C * 8
    mla = make_config(dict(attn="mla", n_head=4, kv_latent_dim=16, rope_head_dim=8, qk_nope_head_dim=16,
                           v_head_dim=8), n_layer=1, pos_emb="rope")
    assert mixing(mla) == 6 * T * 4 * ((16 + 8) + 8)
    nsa = make_config(dict(attn="nsa", n_head=4, compress_block_size=4, compress_stride=2, selection_block_size=4,
                           num_selected_blocks=3, sliding_window_size=64), n_layer=1)
    assert mixing(nsa) == 12 * C * (T // 2 + 3 * 4 + T)
    mamba = dict(attn="mamba", ffn="none", d_state=4, expand=2)
    scan = 27 * 2 * C * 4
    assert mixing(make_config(mamba, n_layer=1, pos_emb="none")) == scan
    hyena = make_config(dict(attn="hyena", hyena_order=3), n_layer=1)
    fft = 3 * 2 * C * (2 * 2.5 * 2 * T * 6 + 6 * (T + 1)) / T  # two convolutions, log2(2T) = 6
    assert mixing(hyena) == pytest.approx(fft)
    hybrid = make_config([mamba, mamba, dict(attn="gqa", n_head=4, n_kv_heads=2)], pos_emb="none")
    assert mixing(hybrid) == 2 * scan + full


def test_compare_runs_a_flag_off_and_on(capsys):
    result = bench.main(["--compare", "act_recomp", "--n_layer", "1", "--steps", "1", "--warmup", "0",
                         "--batch_size", "2", "--block_size", "16", "--total_batch_size_str", "32"])
    out = capsys.readouterr().out
    assert "--no_act_recomp: cpu" in out and "--act_recomp: cpu" in out and "--act_recomp / --no_act_recomp" in out
    assert result["tokens_per_s_ratio"] == pytest.approx(result["on"]["tokens_per_s"] / result["off"]["tokens_per_s"])


def test_compare_needs_a_boolean_flag(capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        bench.main(["--compare", "n_layer"])
    assert exit_info.value.code == 2 and "--compare='n_layer' is not a boolean flag" in capsys.readouterr().err


def test_cpu_suite_runs_every_row_and_writes_json_and_markdown(tmp_path):
    from llm.bench_suite import ROWS

    result = bench.main(["--suite", "cpu", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "s.json"),
                         "--markdown", str(tmp_path / "s.md")])
    assert [row["row"] for row in result["rows"]] == [row.name for row in ROWS]
    for row in result["rows"]:
        for label, variant in row["variants"].items():
            assert ("tokens_per_s" in variant) != ("error" in variant), (row["row"], label)
    ran = {label for row in result["rows"] for label, v in row["variants"].items() if "tokens_per_s" in v}
    assert {"gpt2", "llama1b", "genomic", "dense", "moe", "gqa", "mla", "off", "on", "sdpa", "bf16"} <= ran
    assert json.loads((tmp_path / "s.json").read_text())["suite"] == "cpu"
    table = (tmp_path / "s.md").read_text()
    assert all(row.name in table for row in ROWS) and "| MLA vs GQA | tokens/s >= 0.9x | tokens/s x" in table


def test_gpu_suite_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the message shown where no GPU is visible")
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        bench.main(["--suite", "gpu"])
    assert exit_info.value.code == 2 and "--suite gpu needs a CUDA GPU" in capsys.readouterr().err
