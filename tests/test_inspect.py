"""python -m llm.data.inspect: a prepared dataset's figures and a few windows decoded, with the targets that never
count in the loss marked."""
import subprocess
import sys

import pytest

from llm.data.inspect import main
from tests.conftest import REPO
from tests.test_genomic import prepare_genomic, random_records, write_fasta


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm.data.inspect", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def test_text_windows_decode_to_the_source_text(char_data):
    result = inspect("shakespeare_char", "--data_dir", str(char_data.parent), "--windows", "2", "--block_size", "40")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{char_data}: char tokenizer, 65 ids (largest used 64), stored as uint16"
    assert lines[1] == "  train: 1,003,855 tokens" and lines[2] == "  val: 111,539 tokens"
    windows = [line[2:] for line in lines if line.startswith("  ") and not line.startswith(("  train", "  val",
                                                                                            "  source", "  40 of"))]
    assert len(windows) == 2 and all(len(w.replace("\\n", "\n")) == 40 for w in windows)
    text = open(lines[3].split(": ", 1)[1]).read()
    assert all(w.replace("\\n", "\n") in text for w in windows)
    assert lines.count("  40 of 40 targets count in the loss") == 2


def test_sequence_windows_mark_the_special_tokens_and_loss_mask(tmp_path):
    fasta = write_fasta(tmp_path / "g.fa", random_records(0, [30] * 40, alphabet="ACGTN"))
    folder, meta, _ = prepare_genomic(tmp_path, fasta, "nucleotide")
    result = inspect(str(folder), "--windows", "3", "--block_size", "64", "--loss_mask", "acgt")
    assert result.returncode == 0, result.stderr
    assert " sequences" in result.stdout.splitlines()[1]  # the sequence index is counted
    windows = [line for line in result.stdout.splitlines() if line.startswith("  ") and "targets count" not in line
               and "[" in line]
    assert windows and all("[N]" in w or "[<" in w for w in windows)  # N is outside ACGT; begin/end never count
    assert "targets count in the loss; [bracketed] tokens never do" in result.stdout


def test_mistakes_are_one_line(char_data, tmp_path, capsys):
    missing = inspect("nowhere", "--data_dir", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.startswith("error: dataset='nowhere'") and \
        len(missing.stderr.strip().splitlines()) == 1
    for flags, message in ((["--uppercase_labels"], "uses the char tokenizer; drop them"),
                           (["--block_size", "2000000"], "lower --block_size")):  # in this process, as the CLI
        with pytest.raises(SystemExit) as exit_:
            main(["shakespeare_char", "--data_dir", str(char_data.parent), *flags])
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
