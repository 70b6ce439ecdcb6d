"""Checkpoints and exact resume, signals, NaN stops, accumulation, and the shell scripts' flags end to end."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm import checkpoint as checkpoint_module
from llm.checkpoint import find_checkpoint, step_checkpoints
from llm.cli import parse
from llm.config import ConfigError, config_dict
from llm.model import build_model
from llm.train import loop, train
from llm.train.optim import Schedule, build_optimizer
from tests.conftest import REPO, SHAKESPEARE, make_config

# A small MoE model with dropout, gradient accumulation and evaluation: everything a resume must restore.
SMALL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
         "--total_batch_size_str", "2*4*32", "--dropout", "0.1", "--moe", "--n_exp", "4", "--n_act", "3",
         "--aux_free", "--gamma", "0.01", "--up_dim", "32", "--learning_rate", "3e-3", "--warmup_steps", "3",
         "--log_interval", "1", "--eval", "--eval_interval", "3", "--eval_iters", "2", "--max_iters", "10"]


def run(char_data, tmp_path, name: str, *extra: str) -> list[dict]:
    argv = SMALL + ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--wandb_run_name", name, *extra]
    train(*parse(argv))
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def losses(metrics: list[dict]) -> dict[int, tuple]:
    return {m["step"]: (m["loss"], m["grad_norm"], m.get("val_loss")) for m in metrics}


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory):
    return losses(run(char_data, tmp_path_factory.mktemp("full"), "full"))


@pytest.mark.parametrize("stop_after,order", [(1, "random"), (4, "random"), (7, "epoch")])
def test_resume_is_bit_exact(char_data, tmp_path, uninterrupted, stop_after, order, tmp_path_factory):
    reference = uninterrupted
    if order == "epoch":
        reference = losses(run(char_data, tmp_path_factory.mktemp("epoch"), "full", "--data_order", order))
    run(char_data, tmp_path, "first", "--data_order", order, "--save_model", "--ckpt_interval", str(stop_after),
        "--keep_last", "20")
    checkpoint = tmp_path / "first" / "checkpoints" / f"step_{stop_after:07d}"
    resumed = losses(run(char_data, tmp_path, "second", "--data_order", order, "--resume", str(checkpoint)))
    assert sorted(resumed) == list(range(stop_after, 10))
    assert all(resumed[step] == reference[step] for step in resumed), (resumed, reference)


def before_each_step(monkeypatch, action) -> None:
    """Calls action(step) as the loop asks for the step's learning rate."""
    rate = Schedule.__call__

    def patched(self, step):
        action(step)
        return rate(self, step)

    monkeypatch.setattr(Schedule, "__call__", patched)


def test_sigterm_saves_and_resume_latest_continues_exactly(char_data, tmp_path, uninterrupted, monkeypatch):
    before_each_step(monkeypatch, lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        run(char_data, tmp_path, "r")
    assert stopped.value.code == 143  # 128 + SIGTERM: schedulers requeue, shell loops stop
    first = losses([json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()])
    assert sorted(first) == [0, 1, 2, 3]  # stopped after the step during which the signal came
    assert [p.name for p in step_checkpoints(tmp_path / "r")] == ["step_0000003", "step_0000004"]  # best, stop
    monkeypatch.undo()
    resumed = run(char_data, tmp_path, "r", "--resume", "latest")
    assert all(losses(resumed)[step] == uninterrupted[step] for step in range(4, 10))
    assert len(resumed) == 10  # metrics.jsonl is appended to


def test_checkpoints_are_pruned_to_keep_last_and_best(char_data, tmp_path):
    run(char_data, tmp_path, "k", "--save_model", "--ckpt_interval", "1", "--keep_last", "2")
    best = json.loads((tmp_path / "k" / "checkpoints" / "best.json").read_text())
    names = [p.name for p in step_checkpoints(tmp_path / "k")]
    assert names[-2:] == ["step_0000009", "step_0000010"] and len(names) == 2 + (best["step"] < 9)
    assert f"step_{best['step']:07d}" in names and best["step"] in (3, 6, 9, 10)  # evaluated after 3, 6, 9, 10 steps


def test_interrupted_save_leaves_the_previous_checkpoint(char_data, tmp_path, monkeypatch):
    run(char_data, tmp_path, "c", "--save_model", "--ckpt_interval", "5", "--max_iters", "5")
    real_save = torch.save

    def crash(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as f:  # half-written, then the machine dies
            f.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError):
        run(char_data, tmp_path, "c", "--save_model", "--ckpt_interval", "5", "--resume", "latest")
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert find_checkpoint("latest", tmp_path / "c").name == "step_0000005"
    assert list((tmp_path / "c" / "checkpoints").glob("step_*.tmp"))  # the unfinished one is left aside
    resumed = run(char_data, tmp_path, "c", "--resume", "latest")
    assert resumed[-1]["step"] == 9


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(char_data, tmp_path, monkeypatch):
    step_fn = loop.train_step
    calls = []

    def nan_from_step_3(*args):
        result = step_fn(*args)
        calls.append(1)
        return result._replace(loss=result.loss * float("nan")) if len(calls) > 3 else result

    monkeypatch.setattr(loop, "train_step", nan_from_step_3)
    with pytest.raises(SystemExit, match=r"NaN or infinite at step 3; the last good checkpoint is .*step_0000003"):
        run(char_data, tmp_path, "n", "--save_model", "--ckpt_interval", "2", "--log_interval", "5")
    assert [p.name for p in step_checkpoints(tmp_path / "n")][-1] == "step_0000003"  # nothing saved after step 3


def test_a_non_finite_validation_loss_is_logged_then_stops_the_run(char_data, tmp_path, monkeypatch):
    estimate = loop.estimate_loss

    def nan_validation(*args):
        return {name: float("nan") if name == "val_loss" else value for name, value in estimate(*args).items()}

    monkeypatch.setattr(loop, "estimate_loss", nan_validation)
    with pytest.raises(SystemExit, match=r"^error: val_loss=nan at the evaluation after step 2; the last good "
                                         r"checkpoint is .*step_0000002; lower --learning_rate"):
        run(char_data, tmp_path, "v", "--save_model", "--ckpt_interval", "2")
    rows = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["val_loss"] != rows[-1]["val_loss"]  # logged as NaN
    assert [p.name for p in step_checkpoints(tmp_path / "v")][-1] == "step_0000002"  # nothing saved from step 2


def test_resume_with_other_flags_lists_the_differences(char_data, tmp_path):
    run(char_data, tmp_path, "d", "--save_model", "--max_iters", "3", "--ckpt_interval", "3")
    with pytest.raises(ConfigError, match=r"different config \(n_embd: 32 -> 64; learning_rate: 0.003 -> 0.001\)"):
        run(char_data, tmp_path, "d", "--resume", "latest", "--n_embd", "64", "--learning_rate", "1e-3")
    with pytest.raises(ConfigError, match="no checkpoint in"):
        run(char_data, tmp_path, "empty", "--resume", "latest")


def test_resume_reads_the_saved_config_so_flags_need_not_be_repeated(char_data, tmp_path, capsys):
    """The first command's flags (a small MoE model, not the tiny preset) come back from the run's config.json; only
    the run's location and --resume are given, and a flag given (max_iters) still overrides the file."""
    run(char_data, tmp_path, "s", "--save_model", "--max_iters", "5", "--ckpt_interval", "5")
    where = ["--out_dir", str(tmp_path), "--wandb_run_name", "s"]
    model_config, cfg = parse([*where, "--resume", "latest", "--max_iters", "10"])
    assert model_config.n_embd == 32 and model_config.layers[0].ffn == "moe" and cfg.max_iters == 10
    assert f"the run's settings come from {tmp_path / 's' / 'config.json'}" in capsys.readouterr().out
    train(model_config, cfg)
    resumed = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in resumed] == list(range(10))
    checkpoint = tmp_path / "s" / "checkpoints" / "step_0000005"
    assert parse(["--resume", str(checkpoint), "--out_dir", str(tmp_path / "other")])[0].n_embd == 32


def test_four_micro_batches_equal_one_batch_four_times_larger():
    torch.manual_seed(0)
    model = build_model(make_config(dict(attn="gqa", n_head=4, n_kv_heads=2), pos_emb="rope"))
    idx = torch.randint(0, 97, (8, 32))
    model(idx, idx).loss.backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for micro in idx.chunk(4):
        (model(micro, micro).loss / 4).backward()
    for a, b in zip(whole, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_min_lr_and_betas_reach_the_optimizer(char_data, tmp_path):
    metrics = run(char_data, tmp_path, "o", "--min_lr", "1e-4", "--beta2", "0.99", "--weight_decay", "0.05",
                  "--max_iters", "4", "--warmup_steps", "1")
    assert metrics[-1]["lr"] == pytest.approx(1e-4 + 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 3)).item())
                                              * (3e-3 - 1e-4))
    _, cfg = parse(SMALL + ["--beta1", "0.8", "--beta2", "0.99", "--weight_decay", "0.05"])
    model = build_model(make_config())
    decayed, plain = build_optimizer(model, cfg, torch.device("cpu")).param_groups
    assert decayed["betas"] == plain["betas"] == (0.8, 0.99)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])


def test_float16_with_grad_scaler_trains_on_cpu(char_data, tmp_path):
    metrics = run(char_data, tmp_path, "h", "--dtype", "float16", "--max_iters", "3", "--no_eval")
    assert len(metrics) == 3 and all(m["loss"] < 5 for m in metrics)


def test_single_run_script_with_the_usual_flags(char_data, tmp_path):
    env = {**os.environ, "MAX_ITERS": "4", "N_LAYER": "1", "BATCH_SIZE": "4", "TOTAL_BATCH": "4*128",
           "EVAL_INTERVAL": "2", "EVAL_ITERS": "2", "MOE": "1", "AUX_FREE": "1", "WANDB_MODE": "offline",
           "RUN_NAME": "trial_run_w/o_mix"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "train_single.sh"), "--data_dir", str(char_data.parent),
                             "--out_dir", str(tmp_path), "--save_model", "--act_recomp", "--wandb_log",
                             "--log_interval", "1"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "trial_run_w_o_mix"
    assert [p.name for p in step_checkpoints(run_dir)][-1] == "step_0000004"
    assert "val" in result.stdout and (run_dir / "wandb").is_dir()  # wandb's files stay with the run


def test_train_py_reports_a_bad_resume_in_one_line(tmp_path, char_data):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--data_dir", str(char_data.parent),
                             "--out_dir", str(tmp_path), "--resume", "latest"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: --resume=latest: no checkpoint in")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_cuda_device_without_a_gpu_is_a_clear_error(char_data, tmp_path):
    with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU is visible; use --device cpu"):
        run(char_data, tmp_path, "g", "--device", "cuda")


@pytest.mark.parametrize("killed_at", [2, 5])  # before and after the first checkpoint (after step 2)
def test_resume_auto_continues_a_killed_run_with_the_same_command(char_data, tmp_path, uninterrupted, monkeypatch,
                                                                   capsys, killed_at):
    command = ("r", "--resume", "auto", "--save_model", "--ckpt_interval", "3", "--no_eval")

    def killed(step):
        if step == killed_at:
            raise RuntimeError("killed")

    before_each_step(monkeypatch, killed)
    with pytest.raises(RuntimeError, match="killed"):
        run(char_data, tmp_path, *command)
    assert "starting fresh (--resume auto)" in capsys.readouterr().out
    monkeypatch.undo()
    rows = run(char_data, tmp_path, *command)
    out = capsys.readouterr().out
    assert ("resumed from" in out and "step_0000003 at step 3" in out) if killed_at > 3 else "starting fresh" in out, out
    assert [row["step"] for row in rows] == list(range(10))  # the killed run's rows past the checkpoint are gone
    assert {step: figures[:2] for step, figures in losses(rows).items()} == \
        {step: figures[:2] for step, figures in uninterrupted.items()}  # evaluation never changes training


def test_resume_drops_a_torn_last_row(char_data, tmp_path):
    run(char_data, tmp_path, "t", "--save_model", "--ckpt_interval", "2", "--max_iters", "4")
    path = tmp_path / "t" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a write cut short by a kill
    rows = run(char_data, tmp_path, "t", "--resume", "auto", "--max_iters", "6")
    assert [row["step"] for row in rows] == list(range(6))


def test_a_config_saved_before_ffn_and_objective_resumes_without_differences():
    model, cfg = parse(["--moe", "--n_layer", "2"])
    current = config_dict(model, cfg)
    older = json.loads(json.dumps(current))
    for layer in older["model"]["layers"]:
        layer["moe"] = layer.pop("ffn") == "moe"  # how configs were written when the kind was a switch
    del older["model"]["objective"]
    assert checkpoint_module.config_differences(older, 1, current, 1) == []
    older["model"]["layers"][1]["moe"] = False
    assert checkpoint_module.config_differences(older, 1, current, 1) == ["layers[1].ffn: 'dense' -> 'moe'"]


def test_ctrl_c_saves_then_train_py_and_the_sweep_exit_130(char_data, tmp_path):
    """SIGINT to the sweep's process group (Ctrl-C in a terminal): the run saves, exits 130, and the sweep stops."""
    env = {**os.environ, "ATTNS": "mha gqa", "MOES": "0", "MAX_ITERS": "100000", "BATCH_SIZE": "4",
           "TOTAL_BATCH": "4*128", "OUT_DIR": str(tmp_path)}
    sweep = subprocess.Popen(["bash", str(REPO / "scripts" / "sweep.sh"), "--data_dir", str(char_data.parent),
                              "--n_layer", "1", "--log_interval", "1", "--save_model"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    metrics = tmp_path / "sweep" / "attn-mha" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the first run has logged a step
    os.killpg(sweep.pid, signal.SIGINT)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out + err
    assert "the running runs saved their checkpoints; rerun the same command to continue" in err
    assert step_checkpoints(tmp_path / "sweep" / "attn-mha") and not (tmp_path / "sweep" / "attn-gqa").exists()


def test_ctrl_c_during_start_up_exits_130_in_one_line(char_data, tmp_path):
    """SIGINT while train.py still imports torch and sets up: no traceback, exit 130."""
    started = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--data_dir", str(char_data.parent),
                                "--out_dir", str(tmp_path)], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal,
    # even when the tests themselves run in the background (where SIGINT is ignored, and children inherit that)
    maps = Path(f"/proc/{started.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # inside main(), importing torch
        time.sleep(0.01)
    started.send_signal(signal.SIGINT)
    _, err = started.communicate(timeout=120)
    assert started.returncode == 130 and err == "interrupted during start-up; nothing was trained\n", err


def test_resume_with_other_layer_fields_names_only_those_fields(char_data, tmp_path):
    run(char_data, tmp_path, "l", "--save_model", "--max_iters", "3", "--ckpt_interval", "3")
    with pytest.raises(ConfigError) as refused:
        run(char_data, tmp_path, "l", "--resume", "latest", "--n_head", "4")
    message = str(refused.value)
    assert "(layers[*].n_head: 2 -> 4)" in message and len(message) < 300, message
    old = {"attn": "mha", "n_head": 2, "ffn": "dense"}
    new = [old, {**old, "n_head": 4}, old, {**old, "ffn": "moe"}]
    assert checkpoint_module.layer_differences([old] * 4, new) == [("layers[1].n_head", 2, 4),
                                                                   ("layers[3].ffn", "dense", "moe")]


def test_resume_on_data_prepared_again_from_other_text_is_refused_unless_allowed(char_data, tmp_path, capsys):
    """The loaders' saved positions would land elsewhere in the new tokens: a one-line error names the dataset."""
    from llm.data.prepare import PrepareArgs, prepare

    data = tmp_path / "data"
    shutil.copytree(char_data, data / "shakespeare_char")
    flags = ["--data_dir", str(data), "--save_model", "--max_iters", "3", "--ckpt_interval", "3"]
    run(char_data, tmp_path, "d", *flags)
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    (tmp_path / "other.txt").write_text("".join(reversed(lines)))  # other tokens, the same characters and vocabulary
    prepare(PrepareArgs(name="shakespeare_char", source=str(tmp_path / "other.txt"), out=str(data / "shakespeare_char"),
                        workers=1, force=True), verbose=False)
    with pytest.raises(ConfigError, match=r"^dataset 'shakespeare_char' differs from the one checkpoint .*step_0000003 "
                                          r"was trained on \(meta.json: "):
        run(char_data, tmp_path, "d", *flags, "--max_iters", "4", "--resume", "latest")
    resumed = run(char_data, tmp_path, "d", *flags, "--max_iters", "4", "--resume", "latest", "--allow_data_change")
    assert resumed[-1]["step"] == 3
    with pytest.raises(ConfigError, match="no --resume was given"):
        parse(["--allow_data_change"])
