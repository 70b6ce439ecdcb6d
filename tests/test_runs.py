"""What a run owns and tells: its directory, its schedule, its checkpoints' cadence, its last line, and one-line
errors for every damaged checkpoint file."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from llm.checkpoint import load_trained, step_checkpoints
from llm.cli import parse
from llm.config import ConfigError
from llm.train import loop, train
from tests.conftest import REPO

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
        "--total_batch_size_str", "4*32", "--up_dim", "32", "--log_interval", "1", "--learning_rate", "3e-3",
        "--eval_iters", "2"]


def train_run(char_data, out, name: str, *extra: str) -> list[dict]:
    """Trains a tiny model as run `name` under `out` and returns its metrics rows."""
    train(*parse(TINY + ["--data_dir", str(char_data.parent), "--out_dir", str(out), "--wandb_run_name", name,
                         *extra]))
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_with_the_same_name_is_refused_or_moves_the_first_aside(char_data, tmp_path):
    train_run(char_data, tmp_path, "coll", "--max_iters", "4")
    with pytest.raises(ConfigError, match=r"coll already holds a run; continue it with --resume auto \(or latest\), "
                                          r"pick another --wandb_run_name, or pass --overwrite to move it aside to "
                                          r".*coll.replaced-1$"):
        train_run(char_data, tmp_path, "coll", "--max_iters", "3", "--attn", "mqa")
    rows = train_run(char_data, tmp_path, "coll", "--max_iters", "3", "--attn", "mqa", "--overwrite")
    assert [row["step"] for row in rows] == [0, 1, 2]  # this run's rows only
    old = tmp_path / "coll.replaced-1"
    assert json.loads((old / "config.json").read_text())["model"]["layers"][0]["attn"] == "mha"
    assert [p.name for p in step_checkpoints(old)] == ["step_0000004"]  # kept whole, never deleted
    assert [p.name for p in step_checkpoints(tmp_path / "coll")] == ["step_0000003"]
    _, model, _ = load_trained(str(tmp_path / "coll"))
    assert model.config.layers[0].attn == "mqa"  # sample.py reads the run that owns the directory
    train_run(char_data, tmp_path, "coll", "--max_iters", "2", "--attn", "gqa", "--n_kv_heads", "1", "--overwrite")
    assert (tmp_path / "coll.replaced-2").is_dir()


def test_a_resume_extending_max_iters_continues_the_learning_rate(char_data, tmp_path, capsys):
    first = train_run(char_data, tmp_path, "a", "--max_iters", "6", "--ckpt_interval", "3", "--no_eval")
    longer = train_run(char_data, tmp_path, "b", "--max_iters", "12", "--ckpt_interval", "3", "--no_eval",
                       "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000003"))
    assert "max_iters 6 -> 12: the learning rate goes on from" in capsys.readouterr().out
    lrs = {row["step"]: row["lr"] for row in longer}
    assert lrs[3] == first[3]["lr"]  # no jump where the run was extended
    assert all(lrs[s] > lrs[s + 1] for s in range(3, 11)) and lrs[11] > 3e-4  # min_lr is reached at step 12
    again = train_run(char_data, tmp_path, "c", "--max_iters", "12", "--no_eval",
                      "--resume", str(tmp_path / "b" / "checkpoints" / "step_0000009"))
    assert {row["step"]: row["lr"] for row in again} == {s: lrs[s] for s in (9, 10, 11)}  # the schedule is saved


def test_a_batch_larger_than_the_data_is_refused_before_allocation(char_data, tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size=4000 x block_size=32 = 128,000 tokens per micro-batch is "
                                          r"more than .*val.bin holds \([0-9,]+\); lower --batch_size"):
        train_run(char_data, tmp_path, "big", "--batch_size", "4000", "--total_batch_size_str", "4000*32")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not "
                                                "enough memory: you tried to allocate 1099511627776 bytes.")])
def test_running_out_of_memory_is_one_line(char_data, tmp_path, monkeypatch, error):
    def out_of_memory(*args):
        raise error

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    with pytest.raises(ConfigError, match=r"^out of memory with micro-batches of batch_size=4 x block_size=32 tokens; "
                                          r"lower --batch_size"):
        train_run(char_data, tmp_path, "oom", "--max_iters", "2")


def test_equal_checkpoint_and_eval_intervals_give_one_checkpoint_per_interval(char_data, tmp_path):
    train_run(char_data, tmp_path, "eq", "--max_iters", "10", "--eval", "--eval_interval", "5", "--ckpt_interval", "5")
    assert [p.name for p in step_checkpoints(tmp_path / "eq")] == ["step_0000005", "step_0000010"]
    assert json.loads((tmp_path / "eq" / "checkpoints" / "best.json").read_text())["step"] in (5, 10)
    train_run(char_data, tmp_path, "often", "--max_iters", "12", "--eval", "--eval_interval", "2",
              "--ckpt_interval", "4", "--keep_last", "10")
    best = json.loads((tmp_path / "often" / "checkpoints" / "best.json").read_text())["step"]
    steps = [int(p.name[5:]) for p in step_checkpoints(tmp_path / "often")]
    assert [s for s in steps if s % 4 == 0] == [4, 8, 12] and set(steps) - {4, 8, 12} <= {best}  # one best between


def test_metric_lines_count_to_max_iters_and_the_last_line_says_where_the_checkpoint_is(char_data, tmp_path, capsys):
    train_run(char_data, tmp_path, "q", "--max_iters", "3")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith("step")] == ["step 0/3", "step 1/3", "step 2/3"]
    assert all(" | eta " in line for line in lines if line.startswith("step"))
    assert lines[-1] == (f"checkpoint {tmp_path / 'q' / 'checkpoints' / 'step_0000003'}; sample from it with: "
                         f"python sample.py --ckpt {tmp_path / 'q'}")
    train_run(char_data, tmp_path, "n", "--max_iters", "2", "--no_save_model")
    assert capsys.readouterr().out.splitlines()[-1] == "no checkpoint saved (--no_save_model)"


def test_the_run_ends_with_a_summary_of_what_it_trained_and_its_best_checkpoint(char_data, tmp_path, capsys):
    rows = train_run(char_data, tmp_path, "s", "--max_iters", "4", "--eval", "--eval_interval", "2",
                     "--save_model")
    summary = capsys.readouterr().out.splitlines()[-2]
    best = min(rows[1]["val_loss"], rows[3]["val_loss"])
    best_step = 2 if rows[1]["val_loss"] <= rows[3]["val_loss"] else 4
    assert re.fullmatch(rf"trained 4 steps, 512 tokens, in \d+ s; val_loss {rows[3]['val_loss']:.4f}, "
                        rf"{rows[3]['val_bpb']:.4f} bits per byte \(best "
                        rf"{best:.4f}: {re.escape(str(tmp_path / 's' / 'checkpoints' / f'step_{best_step:07d}'))}\)",
                        summary), summary


@pytest.fixture(scope="module")
def trained_run(char_data, tmp_path_factory):
    """A finished tiny run with one checkpoint (step_0000002), copied by each damage case."""
    out = tmp_path_factory.mktemp("runs")
    train_run(char_data, out, "good", "--max_iters", "2", "--eval", "--eval_interval", "2")
    return out / "good"


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def edit_json(change):
    def damage(path):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return damage


def flip_last_byte(path):
    """Damage that keeps the file's format: one bit of the last tensor's data."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def nan_in_a_tensor(path):
    """A NaN written into a well-formed weights file with no checksum beside it (an older checkpoint)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    weights["tok_emb.weight"][0, 0] = float("nan")
    save_file(weights, str(path))
    (path.parent / "weights.sha256").unlink()


CKPT = "checkpoints/step_0000002"
DAMAGED = [  # (file, damage, what reads it, the message's gist)
    (f"{CKPT}/llm.safetensors", truncate, "sample", "llm.safetensors is damaged or truncated"),
    (f"{CKPT}/llm.safetensors", truncate, "resume", "llm.safetensors is damaged or truncated"),
    (f"{CKPT}/llm.safetensors", flip_last_byte, "sample", "llm.safetensors is damaged: its bytes differ from the "
                                                        "checksum recorded in weights.sha256"),
    (f"{CKPT}/llm.safetensors", nan_in_a_tensor, "sample", "llm.safetensors: tok_emb.weight holds NaN or infinite"),
    (f"{CKPT}/llm.safetensors", nan_in_a_tensor, "resume", "llm.safetensors: tok_emb.weight holds NaN or infinite"),
    (f"{CKPT}/state.pt", lambda p: p.unlink(), "resume", "state.pt is missing: the checkpoint has weights but not"),
    (f"{CKPT}/state.pt", truncate, "resume", "state.pt is damaged or truncated (torch.load raised"),
    (f"{CKPT}/state.pt", lambda p: torch.save({"step": 2}, p), "resume", "state.pt lacks optimizer, scaler"),
    (f"{CKPT}/config.json", lambda p: p.write_text("{oops"), "sample", "config.json is not valid JSON"),
    (f"{CKPT}/config.json", lambda p: p.write_text(""), "resume", "config.json is not valid JSON"),
    (f"{CKPT}/config.json", lambda p: p.write_text("[1, 2]"), "sample", "config.json holds a list, not a JSON object"),
    (f"{CKPT}/config.json", lambda p: p.unlink(), "sample", "config.json is missing"),
    (f"{CKPT}/config.json", edit_json(lambda d: d.pop("model")), "sample", "config.json has no 'model' section"),
    (f"{CKPT}/config.json", edit_json(lambda d: d["model"].update(n_embd=64)), "sample",
     "config.json does not describe the weights (shape (weights vs config): tok_emb.weight (128, 32) vs (128, 64)"),
    (f"{CKPT}/config.json", edit_json(lambda d: d["model"].update(n_layer="2")), "sample", "n_layer='2' must be int"),
    (f"{CKPT}/tokenizer.json", lambda p: p.unlink(), "sample", "tokenizer.json is missing; copy it from another"),
    (f"{CKPT}/llm.safetensors", lambda p: shutil.copy(p, p.with_name("copy.safetensors")), "sample",
     "should hold one .safetensors file, found 2"),
    ("checkpoints/best.json", lambda p: p.write_text("{"), "sample", "best.json is not valid JSON"),
    ("checkpoints/best.json", lambda p: p.write_text('{"val_loss": 1.0}'), "sample", "best.json has no integer 'step'"),
]


@pytest.mark.parametrize("file,damage,reader,message", DAMAGED,
                         ids=[f"{f.split('/')[-1]}-{r}-{m[:30]}" for f, _, r, m in DAMAGED])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(trained_run, char_data, tmp_path, file, damage, reader,
                                                         message):
    run_dir = tmp_path / "good"
    shutil.copytree(trained_run, run_dir)
    damage(run_dir / file)
    with pytest.raises(ConfigError) as refused:
        if reader == "sample":
            load_trained(str(run_dir))
        else:
            train_run(char_data, tmp_path, "good", "--max_iters", "4", "--eval", "--eval_interval", "2",
                      "--resume", "latest")
    text = str(refused.value)
    assert message in text and "\n" not in text, text
    assert str(run_dir) in text or file.split("/")[-1] in text  # names the file (or its folder)


def test_sampling_needs_only_the_weights_and_config(trained_run, tmp_path):
    run_dir = tmp_path / "good"
    shutil.copytree(trained_run, run_dir)
    (run_dir / CKPT / "state.pt").unlink()
    folder, model, tokenizer = load_trained(str(run_dir))
    assert folder.name == "step_0000002" and tokenizer["tokenizer"] == "char"


def test_sample_py_exits_2_with_one_line_on_truncated_weights(trained_run, tmp_path):
    run_dir = tmp_path / "good"
    shutil.copytree(trained_run, run_dir)
    truncate(run_dir / CKPT / "llm.safetensors")
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(run_dir)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "llm.safetensors is damaged or truncated" in result.stderr


def test_the_report_reads_one_runs_rows(tmp_path):
    from llm.report import read_rows

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in (0, 10, 19, 0, 10)] + ['{"step": 20, "lo']  # two runs, a torn end
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    assert [row["step"] for row in read_rows(path)] == [0, 10]
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ConfigError, match="metrics.jsonl line 2 is not a metrics row"):
        read_rows(path)


def test_an_unset_total_batch_is_one_micro_batch_per_rank_and_the_run_records_it(char_data, tmp_path, capsys):
    """No fixed default that breaks when the shape changes: 3 x 50 tokens is one step's batch, said and recorded."""
    model_config, cfg = parse(["--batch_size", "3", "--block_size", "50", "--n_layer", "1", "--max_iters", "2",
                               "--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--save_model"])
    assert cfg.total_batch_size_str is None
    train(model_config, cfg)
    assert "total_batch_size_str unset: one micro-batch per rank, 150 tokens per step" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["total_batch_size_str"] == "150"
    resumed = parse(["--batch_size", "3", "--block_size", "50", "--n_layer", "1", "--max_iters", "3",
                     "--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--resume", "auto"])
    assert train(*resumed)["step"] == 2  # the unset total resolves to the same 150 tokens: no difference


def test_resume_compares_tokens_per_step_not_their_spelling():
    from llm.checkpoint import config_differences
    from llm.config import config_dict

    model_config, cfg = parse(["--total_batch_size_str", "2**11"])
    saved = config_dict(model_config, cfg)
    same = config_dict(model_config, dataclasses.replace(cfg, total_batch_size_str="2048"))
    doubled = config_dict(model_config, dataclasses.replace(cfg, total_batch_size_str="4096"))
    assert config_differences(saved, 1, same, 1) == []
    assert config_differences(saved, 1, doubled, 1) == ["tokens per step: 2048 -> 4096"]


def test_init_from_one_of_our_runs_fine_tunes_its_weights_with_a_fresh_optimizer(char_data, tmp_path, capsys):
    from safetensors.torch import load_file

    train_run(char_data, tmp_path, "base", "--max_iters", "4", "--save_model")
    base = load_trained(str(tmp_path / "base"))[1].state_dict()
    # the model flags come with the weights; a tiny rate leaves them where they started
    train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--wandb_run_name", "tuned",
                  "--batch_size", "4", "--log_interval", "1", "--max_iters", "1", "--save_model", "--init_from",
                  str(tmp_path / "base"), "--learning_rate", "1e-12", "--warmup_steps", "0"]))
    tuned = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert "initialised from " in capsys.readouterr().out and tuned[0]["step"] == 0  # a fresh schedule: step 0
    saved = step_checkpoints(tmp_path / "tuned")[-1]
    weights = load_file(str(next(saved.glob("*.safetensors"))))
    assert set(weights) <= set(base) and all(torch.allclose(weights[k], base[k], atol=1e-6) for k in weights)
    with pytest.raises(ConfigError, match=r"^--n_layer is not honoured with --init_from .*base: the architecture"):
        parse(["--init_from", str(tmp_path / "base"), "--n_layer", "3"])
    with pytest.raises(ConfigError, match="init_from='nowhere' is not supported; use hf:DIR"):
        parse(["--init_from", "nowhere"])
    with pytest.raises(ConfigError, match="there is no --init_from hf:DIR; drop --no_import_check"):
        parse(["--no_import_check"])
