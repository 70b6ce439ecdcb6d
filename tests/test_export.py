"""python -m llm.export: its usage line, a non-empty --out refused unless --overwrite, one-line errors."""
from pathlib import Path

import pytest

from llm import export
from llm.cli import parse
from llm.train import train


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A run folder with one saved checkpoint of a tiny char model (it exports as GPT2LMHeadModel)."""
    out_dir = tmp_path_factory.mktemp("export")
    train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(out_dir), "--max_iters", "1",
                  "--save_model", "--n_layer", "1", "--block_size", "16"]))
    return out_dir / "run"


def exits_with_one_line(argv: list[str], capsys) -> str:
    """The error line that export's main prints for argv, after checking that it exits with code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_help_usage_names_the_module(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert help_text.startswith("usage: python -m llm.export ") and "--overwrite" in help_text


def test_a_non_empty_out_is_refused_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    export.main(["--ckpt", str(run), "--out", str(out)])  # an empty folder is fine
    assert (out / "config.json").is_file()
    (out / "notes.txt").write_text("mine")
    err = exits_with_one_line(["--ckpt", str(run), "--out", str(out)], capsys)
    assert f"--out={out} exists and is not empty; pass --overwrite to replace it" in err
    assert (out / "notes.txt").read_text() == "mine"
    export.main(["--ckpt", str(run), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_overwrite_never_deletes_the_checkpoint(run, capsys):
    err = exits_with_one_line(["--ckpt", str(run), "--out", str(run), "--overwrite"], capsys)
    assert f"--out={run} holds the checkpoint" in err and "pass another --out" in err
    assert any((run / "checkpoints").iterdir())


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    err = exits_with_one_line(["--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")], capsys)
    assert f"--ckpt={tmp_path / 'nowhere'}" in err
    assert not (tmp_path / "hf").exists()
