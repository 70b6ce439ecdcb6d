"""Bits per byte, the scale on which models with different tokenizers compare: every prepared dataset records its
UTF-8 bytes (for sequence data: letters) per token, and causal runs report SPLIT_bpb = loss / ln 2 / bytes per
token."""
import dataclasses
import json
import math

import tiktoken

from llm.cli import parse
from llm.data.prepare import PrepareArgs, prepare
from llm.train import loop, train
from tests.conftest import SHAKESPEARE
from tests.test_genomic import random_records, write_fasta


def meta_of(folder) -> dict:
    return json.loads((folder / "meta.json").read_text())


def test_bytes_per_token_of_characters_bpe_and_codons(tmp_path, char_data):
    assert meta_of(char_data)["bytes_per_token"] == 1.0  # Tiny Shakespeare is ASCII: one byte per character
    text = SHAKESPEARE.read_text()
    bpe = prepare(PrepareArgs(name="shakespeare", source=str(SHAKESPEARE), out=str(tmp_path / "bpe"), workers=1),
                  verbose=False)
    tokens = len(tiktoken.get_encoding("r50k_base").encode_ordinary(text))
    assert abs(meta_of(bpe)["bytes_per_token"] - len(text.encode("utf-8")) / tokens) < 1e-5
    records = random_records(0, [301, 299, 600], alphabet="ACGTN")  # N: k-mers holding it are <unk>, still letters
    fasta = write_fasta(tmp_path / "g.fa", records)
    codons = prepare(PrepareArgs(name="genomic", source=str(fasta), out=str(tmp_path / "k"), tokenizer="3mer",
                                 workers=1), verbose=False)
    content = sum(len(r) // 3 for r in records)  # a trailing partial codon is dropped; begin/end carry no letters
    assert abs(meta_of(codons)["bytes_per_token"] - sum(len(r) for r in records) / content) < 1e-5


def test_a_character_model_reports_loss_over_ln2_as_bits_per_byte(tmp_path, char_data, capsys):
    argv = ["--n_layer", "1", "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--max_iters", "3",
            "--eval_interval", "3", "--eval_iters", "2", "--data_dir", str(char_data.parent), "--out_dir",
            str(tmp_path), "--no_save_model"]
    metrics = train(*parse(argv))
    assert metrics["val_bpb"] == metrics["val_loss"] / math.log(2)  # one byte per token
    assert metrics["train_bpb"] == metrics["train_loss"] / math.log(2)
    assert f", {metrics['val_bpb']:.4f} bits per byte" in capsys.readouterr().out
    sources = {"shakespeare_char": (char_data, meta_of(char_data))}
    model_config, cfg = parse(argv)
    assert loop.bytes_per_token(sources, model_config, cfg, True) == {"train": 1.0, "val": 1.0}
    for other in (dataclasses.replace(model_config, objective="mlm"), dataclasses.replace(model_config, loss="hxe")):
        assert loop.bytes_per_token(sources, other, cfg, True) == {}  # no likelihood of the text
