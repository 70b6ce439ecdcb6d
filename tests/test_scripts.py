"""The ablation scripts and the report, end to end on a few steps."""
import json
import os
import runpy
import subprocess
import sys

import pytest

from llm import report
from llm.config import ConfigError, exit_on_user_error
from tests.conftest import REPO

FAST = {"MAX_ITERS": "3", "BATCH_SIZE": "4", "TOTAL_BATCH": "4*128", "EVAL_INTERVAL": "2",
        "EVAL_ITERS": "2"}


def script(name: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def test_sweep_runs_a_grid_then_the_report_compares_it(char_data, tmp_path):
    env = {**FAST, "ATTNS": "mha mla", "MOES": "0", "OUT_DIR": str(tmp_path)}
    result = script("sweep.sh", env, "--data_dir", str(char_data.parent), "--n_layer", "1", "--log_interval", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "all 2 runs finished" in result.stdout
    runs = sorted(str(p) for p in (tmp_path / "sweep").glob("[!.]*"))
    assert [os.path.basename(r) for r in runs] == ["attn-mha", "attn-mla"]
    config = json.loads((tmp_path / "sweep" / "attn-mla" / "config.json").read_text())
    assert (config["model"]["layers"][0]["ffn"], config["model"]["layers"][0]["up_dim"]) == ("dense", 768)

    table = report.report(runs, str(tmp_path / "report"))
    lines = table.splitlines()
    assert lines[0].startswith("| attn | seeds | params (active) | tokens |")  # attn alone differs
    assert sorted(line.split(" | ")[0] for line in lines[2:4]) == ["| mha", "| mla"]
    assert all("| 1 | " in line and "| 1,536 |" in line for line in lines[2:4])  # one seed; 3 steps of 4 x 128
    assert (tmp_path / "report" / "report.md").read_text() == table
    assert (tmp_path / "report" / "loss.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="already holds report.md, report.csv, loss.png, training.png of an earlier report"):
        report.report(runs[:1], str(tmp_path / "report"))
    alone = report.report(runs[:1], str(tmp_path / "report"), overwrite=True).splitlines()
    assert alone[0].startswith("| run | seeds |") and alone[2].startswith("| attn-mha |")  # nothing differs


def test_sweep_takes_every_registered_mixer_kind_and_moe(char_data, tmp_path):
    env = {**FAST, "MAX_ITERS": "1", "ATTNS": "nsa mamba", "MOES": "0 1", "OUT_DIR": str(tmp_path)}
    result = script("sweep.sh", env, "--data_dir", str(char_data.parent), "--n_layer", "1", "--no_eval",
                    "--parallel", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sweep").glob("[!.]*")) == [
        f"{ffn}.attn-{attn}" for ffn in ("dense", "moe") for attn in ("mamba", "nsa")]
    config = json.loads((tmp_path / "sweep" / "moe.attn-nsa" / "config.json").read_text())
    assert (config["model"]["layers"][0]["ffn"], config["model"]["layers"][0]["up_dim"]) == ("moe", 256)


def test_sweep_refuses_a_grid_that_does_not_validate_before_any_run(char_data, tmp_path):
    env = {**FAST, "ATTNS": "gqa", "MOES": "1 0", "OUT_DIR": str(tmp_path), "N_KV_HEADS": "3"}  # 3 does not divide 4
    result = script("sweep.sh", env, "--data_dir", str(char_data.parent), "--n_layer", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: run moe: ") and "n_kv_heads=3 does not divide n_head=4" in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_custom_layers_script_trains_the_example_stack(char_data, tmp_path):
    env = {"MAX_ITERS": "2", "BATCH_SIZE": "4", "TOTAL_BATCH": "4*128", "EVAL_INTERVAL": "1", "EVAL_ITERS": "1",
           "RUN_NAME": "custom"}
    result = script("train_custom_layers.sh", env, "--data_dir", str(char_data.parent), "--out_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max/mean load" in result.stdout and (tmp_path / "custom" / "metrics.jsonl").is_file()


def test_families_script_runs_each_family_and_tabulates_them(char_data, tmp_path):
    families = ["record", "mtp", "recurrent"]  # three of the script's families: its loop is the same for each
    env = {"FAMILIES": " ".join(families), "ITERS": "2", "OUT_DIR": str(tmp_path), "DATA_DIR": str(char_data.parent)}
    result = script("families_cpu.sh", env, "--warmup_steps", "1", "--eval_iters", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "family" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == families
    config = json.loads((tmp_path / "family_recurrent" / "config.json").read_text())["model"]
    assert config["arch"] == "recurrent" and config["n_layer"] == 3
    metrics = (tmp_path / "family_mtp" / "metrics.jsonl").read_text()
    assert "mtp/loss_2" in metrics
    record = json.loads((tmp_path / "family_record" / "config.json").read_text())
    assert [b["window"] for b in record["model"]["layers"]] == [64, 32, 32, 64]
    assert (record["model"]["value_embeds"], record["train"]["optimizer"]) == (2, "muon")


def test_mixers_script_trains_each_mixer_and_tabulates_its_decoding(char_data, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "mixers_cpu.py"), "--mixers", "window",
                             "--max_iters", "2", "--eval_iters", "1", "--out_dir", str(tmp_path), "--data_dir",
                             str(char_data.parent), "--", "--warmup_steps", "0"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| ") and "mixer" not in line}
    assert list(rows) == ["window"]
    assert rows["window"][4] == "64"  # 4 layers x 32 tokens of 2 KV heads x 32 x 2 (K and V) fp32, over 1024 tokens
    assert all(float(cells[-1].rstrip(" |").replace(",", "")) > 0 for cells in rows.values())


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "not a run directory" in capsys.readouterr().err


def test_report_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "report").write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["out/run", "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.endswith("report is a file, not a folder; pass a folder path\n")


def test_bytes_script_matches_training_flops_and_reports_bits_per_byte(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bytes_cpu.py"), "--iters", "2", "--batch", "2",
                             "--eval_iters", "1", "--models", "hnet", "--data_dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    cells = result.stdout.splitlines()[-1].split(" | ")
    assert cells[0] == "| hnet" and float(cells[-1].rstrip(" |")) >= 1  # bytes per chunk
    budget = float(next(line for line in result.stdout.splitlines() if line.startswith("budget: ")).split()[1])
    per_step = float(cells[2]) * 1e6 * 2 * 256  # FLOPs per token x batch 2 x 256 bytes
    assert abs(int(cells[3]) * per_step - budget) <= per_step / 2  # the steps that spend the budget
    assert float(cells[6]) == pytest.approx(float(cells[5]) / 0.6931471805599453, abs=2e-3)  # bits per byte


def test_peers_script_checks_logits_then_tabulates_every_case(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "peers_cpu.py"), "--quick", "--rounds", "1",
                             "--steps", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    checks = [line for line in result.stdout.splitlines() if "max abs logit difference" in line]
    assert [line.split(":")[0] for line in checks] == ["llama", "mixtral", "mamba"]
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-4 for line in checks)  # the same model on both sides
    assert all(line.split(" parameters (ours), ")[0].split(": ")[1] == line.split(" (transformers'")[0].split(
        "), ")[1] for line in checks)  # the same parameter count on both sides
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "what" not in line]
    assert len(rows) == 8  # a training step and generation per model, the Muon step and its iteration
    assert all(float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].rstrip(" |").endswith(")") for cells in rows)


def test_peers_script_without_transformers_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # its import fails as where it is not installed
    monkeypatch.setattr(sys, "argv", ["peers_cpu.py", "--quick"])
    runpy.run_path(str(REPO / "scripts" / "peers_cpu.py"), run_name="__main__")  # returns: exit status 0
    assert capsys.readouterr().out.strip() == ("transformers is not installed (pip install -e '.[hf]'); no peer to "
                                               "compare with")
