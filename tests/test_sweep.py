"""python -m llm.sweep: grids over any train.py fields and seeds, run through submitit's local executor, reruns
that skip finished runs, failures that do not stop the sweep, and the SLURM submission it would make."""
import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from llm.config import ConfigError
from llm.sweep import Run, SweepOptions, TrainRun, figures, main, make_executor, match_budgets, plan
from tests.conftest import REPO

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
        "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "1", "--save_model"]


def sweep(char_data, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm.sweep", "--out_dir", str(tmp_path / "out"), *TINY, *args,
                           "--data_dir", str(char_data.parent)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_grid_over_two_seeds_runs_once_and_reports(char_data, tmp_path):
    args = ["--grid", "n_embd=32,48", "--seeds", "0,1", "--name", "g", "--parallel", "2"]
    first = sweep(char_data, tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = tmp_path / "out" / "g"
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == [f"n_embd-{w}.seed-{s}" for w in (32, 48) for s in (0, 1)]
    for name in names:
        config = json.loads((folder / name / "config.json").read_text())
        width, seed = (part.partition("-")[2] for part in name.split("."))
        assert (config["model"]["n_embd"], config["train"]["seed"]) == (int(width), int(seed))
        assert [row["step"] for row in rows(folder / name)] == list(range(6))
    seed_losses = {name: rows(folder / name)[-1]["val_loss"] for name in names}
    assert seed_losses["n_embd-32.seed-0"] != seed_losses["n_embd-32.seed-1"]
    written = {name: (folder / name / "metrics.jsonl").stat().st_mtime_ns for name in names}

    again = sweep(char_data, tmp_path, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished before, skipped") == 4 and "started" not in again.stdout
    assert written == {name: (folder / name / "metrics.jsonl").stat().st_mtime_ns for name in names}

    # The report: two configurations of two seeds; the columns are the fields that differ, the figures the seeds'
    # mean and standard deviation, the p-value Welch's test (scipy's as the reference).
    from scipy import stats as reference

    from llm import report

    runs = [str(folder / name) for name in names]
    table = report.report(runs, str(tmp_path / "report"))
    head = table.splitlines()[0]
    # up_dim too: unset, it is derived from n_embd (4 x), so the runs' configs differ in it as well
    assert head.startswith("| n_embd | up_dim | seeds |") and "seed " not in head and "out_dir" not in head
    lines = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert len(lines) == 2 and all(r["seeds"] == "2" for r in lines)
    finals = {}
    for run in runs:
        last = [json.loads(line) for line in (Path(run) / "metrics.jsonl").open() if "val_loss" in line][-1]
        finals.setdefault(Path(run).name.split(".")[0].partition("-")[2], []).append(last["val_loss"])
    for r in lines:
        values = finals[r["n_embd"]]
        assert float(r["val_loss"]) == pytest.approx(sum(values) / 2, abs=1e-12)
        assert float(r["val_loss_std"]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-12)
    assert [float(r["val_loss"]) for r in lines] == sorted(float(r["val_loss"]) for r in lines)
    best = finals[lines[0]["n_embd"]]
    for r in lines[1:]:
        expected = reference.ttest_ind(finals[r["n_embd"]], best, equal_var=False).pvalue
        assert float(r["p_vs_best"]) == pytest.approx(expected, abs=1e-9)
    assert (tmp_path / "report" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "report" / "training.png").stat().st_size > 1000


def test_a_failed_run_is_reported_in_one_line_and_the_sweep_goes_on(char_data, tmp_path):
    """batch_size 100000 passes the parser but is more than the data holds: that run fails at set-up."""
    result = sweep(char_data, tmp_path, "--grid", "batch_size=4,100000", "--name", "f")
    assert result.returncode == 1
    assert "batch_size-4: finished" in result.stdout
    failed = [line for line in result.stdout.splitlines() if line.startswith("batch_size-100000: failed")]
    assert len(failed) == 1 and "error: batch_size=100000" in failed[0] and "lower --batch_size" in failed[0]
    assert result.stdout.splitlines()[-1] == "1 of 2 runs failed: batch_size-100000"


def test_an_unfinished_run_continues_from_its_checkpoint(char_data, tmp_path):
    first = sweep(char_data, tmp_path, "--name", "u", "--max_iters", "3", "--ckpt_interval", "3")
    assert first.returncode == 0, first.stderr
    more = sweep(char_data, tmp_path, "--name", "u", "--ckpt_interval", "3")  # TINY's max_iters 6
    assert more.returncode == 0, more.stdout + more.stderr
    log = (tmp_path / "out" / "u" / "run" / "train.log").read_text()
    assert "resumed from" in log and [row["step"] for row in rows(tmp_path / "out" / "u" / "run")] == list(range(6))


def test_a_sweep_file_with_named_variants(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("flags: {max_iters: 5, act_recomp: true}\ngrid: {attn: [mha, gqa]}\n"
                    "variants:\n  small: {n_embd: 32, n_kv_heads: 1}\n  wide: {n_embd: 64, n_kv_heads: 2}\n"
                    "seeds: [3]\n")
    runs = plan(SweepOptions(file=str(spec)), ["--n_head", "2"])
    assert [r.name for r in runs] == ["small.attn-mha", "small.attn-gqa", "wide.attn-mha", "wide.attn-gqa"]
    assert runs[3].argv == ["--max_iters", "5", "--act_recomp", "--n_head", "2", "--n_embd", "64", "--n_kv_heads", "2",
                            "--attn", "gqa", "--seed", "3"]
    assert runs[3].differs == {"variant": "wide", "attn": "gqa"}


@pytest.mark.parametrize("args,message", [
    (["--grid", "atn=mha,gqa"], "'atn' is not a train.py field (did you mean \"attn\"?)"),
    (["--grid", "attn"], "is not FIELD=V1,V2"),
    (["--grid", "attn=mha,bogus"], "run attn-bogus: "),
    (["--seed", "3"], "seed is set by the sweep for each run; use --seeds"),
    (["--wandb_run_name", "x"], "wandb_run_name is set by the sweep"),
    (["--seeds", "0,x"], "is not a list of integers"),
    (["--executor", "slurm"], "needs SLURM's srun on PATH"),
])
def test_mistakes_are_one_line_before_anything_runs(args, message, char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # in this process: the command line's exit status and stderr
        main(["--out_dir", str(tmp_path / "out"), *TINY, *args, "--data_dir", str(char_data.parent)])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_dry_run_lists_the_runs_with_their_estimates(char_data, tmp_path):
    result = sweep(char_data, tmp_path, "--grid", "ffn=dense,moe", "--dry_run")
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ffn-")]
    assert [line.split(" | ")[0] for line in table] == ["| ffn-dense", "| ffn-moe"]
    assert all(line.endswith("| new |") for line in table) and not (tmp_path / "out" / "sweep").exists()


def test_slurm_jobs_run_each_run_through_torchrun_with_its_resources(tmp_path, monkeypatch, capsys):
    """No SLURM here: a stand-in srun lets submitit build its executor, whose sbatch script is checked."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    opts = SweepOptions(executor="slurm", partition="gpu", gpus=8, time_min=90, cpus_per_run=32, name="abl")
    script = make_executor(opts, tmp_path / ".submitit")._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=abl"):
        assert line in script
    command = TrainRun(["--max_iters", "5"], str(tmp_path / "log"), gpus=8).command()
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
    assert command[6:] == ["-m", "llm", "--max_iters", "5"]
    with pytest.raises(SystemExit) as exited:
        main(["--executor", "slurm", "--parallel", "2"])
    assert exited.value.code == 2 and "--parallel applies to --executor local" in capsys.readouterr().err


def test_flop_matched_runs_spend_the_same_training_flops_within_one_step(char_data, tmp_path):
    """Attention, Mamba and Hyena differ in FLOPs per token (each kind's mixing): --match flops gives each the
    number of steps that spends the first run's budget; the runs' own logged FLOPs agree within one step's worth."""
    result = sweep(char_data, tmp_path, "--grid", "attn=mha,mamba,hyena", "--name", "m", "--match", "flops",
                   "--pos_emb", "none", "--max_iters", "8", "--parallel", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--match flops: every run gets" in result.stdout
    spent, per_step = {}, {}
    for name in ("attn-mha", "attn-mamba", "attn-hyena"):
        rows_ = rows(tmp_path / "out" / "m" / name)
        config = json.loads((tmp_path / "out" / "m" / name / "config.json").read_text())
        tokens_per_step = int(config["train"]["total_batch_size_str"])
        per_step[name] = rows_[-1]["flops_per_token"] * tokens_per_step
        spent[name] = per_step[name] * config["train"]["max_iters"]
    assert spent["attn-mha"] == per_step["attn-mha"] * 8  # the first run's budget, as given
    assert len(set(per_step.values())) == 3  # the kinds do differ per step
    for name in ("attn-mamba", "attn-hyena"):
        assert abs(spent[name] - spent["attn-mha"]) <= per_step[name] / 2



def test_params_matched_runs_get_the_width_nearest_the_first_runs_parameters(char_data, tmp_path, capsys):
    """An MoE layer holds several experts: matched to the dense run's parameters, its model gets a narrower width."""
    opts = SweepOptions(grid=["ffn=dense,moe"], match="params", out_dir=str(tmp_path))
    runs = plan(opts, ["--n_layer", "2", "--n_head", "2", "--data_dir", str(char_data.parent)])
    match_budgets(runs, opts)
    dense, moe = (figures(run, opts)[3] for run in runs)
    assert runs[1].argv[-2] == "--n_embd" and int(runs[1].argv[-1]) < 128  # the tiny preset's width is 128
    for width in (int(runs[1].argv[-1]) - 8, int(runs[1].argv[-1]) + 8):  # the neighbouring widths are farther
        other = figures(Run(runs[1].name, [*runs[1].argv, "--n_embd", str(width)], {}), opts)[3]
        assert abs(other - dense) >= abs(moe - dense)
    assert "--match params: every run gets about" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--match params sets n_embd, but run ffn-dense sets it"):
        match_budgets(plan(opts, ["--n_embd", "64", "--data_dir", str(char_data.parent)]), opts)


def test_list_and_boolean_values_of_a_sweep_file_become_flags(tmp_path):
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"grid": {"product_key_dim": [[8, 8], [16, 16]], "batch_norm_query": [True, False]}}))
    runs = plan(SweepOptions(file=str(spec)), ["--ffn", "peer"])
    assert runs[1].name == "product_key_dim-8x8.batch_norm_query-false"
    assert runs[1].argv == ["--ffn", "peer", "--product_key_dim", "8", "8", "--no_batch_norm_query"]


def test_the_documented_mixer_sweep_plans_six_flop_matched_runs(char_data, capsys):
    """sweeps/mixers_matched.yaml, as docs/benchmarks.md runs it (its runs take minutes: only planned here)."""
    opts = SweepOptions(file=str(REPO / "sweeps" / "mixers_matched.yaml"), name="mixers", match="flops")
    runs = plan(opts, ["--data_dir", str(char_data.parent)])
    assert [r.name for r in runs] == [f"{kind}.seed-{s}" for kind in ("mha", "mamba", "hyena") for s in (0, 1)]
    match_budgets(runs, opts)
    assert [r.argv[-1] for r in runs] == ["300", "300", "267", "267", "309", "309"]


def test_the_report_takes_benchmark_scores_but_not_our_own_slashed_metrics():
    from llm.report import is_benchmark

    assert all(map(is_benchmark, ["hellaswag_acc", "hellaswag_acc_norm", "mini_choice/acc", "arc_easy/acc_norm"]))
    assert not any(map(is_benchmark, ["val/web_loss", "tokens/web", "mtp/loss_1", "rd/recurrence",
                                      "max_load_ratio/layer3", "val_loss", "grad_norm"]))


def test_the_report_reads_a_field_missing_from_an_older_config_as_its_default(tmp_path):
    """A run written before a field existed ran at its default: it is one configuration with a newer run that
    writes the default, and a different one from a run that moved it."""
    from llm.config import BlockConfig, LLMconfig, Trainconfig
    from llm.report import group, read_run

    def write_run(name: str, drop: bool, **train_fields) -> str:
        config = {"model": asdict(LLMconfig(layers=[BlockConfig()])), "train": asdict(Trainconfig(**train_fields))}
        if drop:  # as a config.json from before these fields
            del config["train"]["fp8_head"], config["model"]["value_embeds"], config["model"]["layers"][0]["alpha"]
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 4.0}) + "\n")
        return str(folder)

    runs = [read_run(write_run("old", True)), read_run(write_run("new", False, seed=1)),
            read_run(write_run("moved", False, grad_clip=0.5))]
    configurations = group(runs)
    assert [[run.name for run in c.runs] for c in configurations] == [["old", "new"], ["moved"]]
    assert configurations[0].differs == {"grad_clip": "1.0"}
