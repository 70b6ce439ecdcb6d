"""The modded-nanogpt configs repository's byte-level family files (tests/data/modded_nanogpt, copied as they are)
convert without --lenient onto MegaByte and H-Net, read back the same through our format, and train."""
import json
import shutil

import pytest

from llm.cli import parse
from llm.config import ConfigError, config_dict
from llm.formats.convert import main as convert_main
from llm.train import train
from tests.conftest import REPO

CONFIGS = REPO / "tests" / "data" / "modded_nanogpt"
TINY = ["--block_size", "32", "--batch_size", "2", "--total_batch_size_str", "64", "--max_iters", "2",
        "--eval_iters", "1", "--no_compile", "--no_wandb_log", "--no_save_model"]
SHRUNK = {  # each file's widths at a CPU test's size (its layer specs, heads and depths as they are)
    "megabyte": ["--n_embd", "32", "--global_byte_embd", "8", "--patch_size", "4"],
    "hnet": ["--n_embd", "48"],
    "hnet_x_nsa": ["--n_embd", "48"],
}


def test_megabyte_yaml_maps_onto_megabyte(capsys):
    model, run = parse(["--config", str(CONFIGS / "megabyte.yaml")])
    assert model.vocab_size is None  # the byte data's
    assert (model.arch, model.patch_size, model.global_byte_embd, model.n_embd, model.n_global_layer,
            model.n_layer, model.block_size) == ("megabyte", 16, 64, 512, 6, 12, 1024)
    assert [(b.n_head, b.up_dim) for b in model.layers] == [(4, 4 * 1024)] * 6 + [(8, 4 * 512)] * 6
    assert (run.dataset, run.max_iters, run.optimizer, run.eval_iters) == ("shakespeare_byte", 1750, "muon", 10240)
    err = capsys.readouterr().err
    assert "model_cfg.pad_id=257 and eos_id=258 (the first patch and each patch's first byte read learned" in err
    assert "python -m llm.data.prepare fineweb --tokenizer byte --out data/fineweb_byte" in err


def test_hnet_yaml_maps_onto_one_stage_of_mamba_around_attention():
    model, _ = parse(["--config", str(CONFIGS / "hnet.yaml")])
    assert (model.arch, model.hnet_encoder_layers, model.hnet_decoder_layers, model.hnet_ratios, model.n_layer,
            model.n_embd, model.norm, model.pos_emb) == ("hnet", [4], [4], [2.0], 20, 768, "rms", "rope")
    kinds = [(b.attn, b.ffn) for b in model.layers]
    assert kinds == [("mamba", "none")] * 4 + [("mha", "dense")] * 12 + [("mamba", "none")] * 4
    assert {(b.n_head, b.non_linearity) for b in model.layers[4:16]} == {(6, "swiglu")}


def test_hnet_x_nsa_yaml_is_an_hnet_with_sparse_attention_inside(capsys):
    model, _ = parse(["--config", str(CONFIGS / "hnet_x_nsa.yaml")])
    assert (model.arch, model.hnet_encoder_layers, model.hnet_ratios, model.n_layer) == ("hnet", [3], [8.0], 12)
    assert [b.attn for b in model.layers] == ["mamba"] * 3 + ["nsa"] * 6 + ["mamba"] * 3
    assert "model_cfg.type=hnet_x_nsa (an H-Net with NSA in its main network" in capsys.readouterr().err


def test_a_key_whose_meaning_differs_is_refused_with_the_reason(tmp_path):
    shutil.copy(CONFIGS / "training.yaml", tmp_path / "training.yaml")
    text = (CONFIGS / "hnet_x_nsa.yaml").read_text().replace("dummy: false", "dummy: true")
    (tmp_path / "hnet_x_nsa.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"model_cfg.dummy \(true; the main network here is native sparse"):
        parse(["--config", str(tmp_path / "hnet_x_nsa.yaml")])


@pytest.mark.parametrize("family", sorted(SHRUNK))
def test_each_byte_family_file_converts_and_trains(family, byte_data, tmp_path):
    path = str(CONFIGS / f"{family}.yaml")
    flags = [*SHRUNK[family], *TINY, "--dataset", byte_data.name, "--data_dir", str(byte_data.parent),
             "--out_dir", str(tmp_path / "out"), "--wandb_run_name", family]
    ours = tmp_path / "ours.yaml"
    convert_main([path, "--out", str(ours)])
    assert config_dict(*parse(["--config", str(ours), *flags])) == config_dict(*parse(["--config", path, *flags]))
    train(*parse(["--config", path, *flags]))
    rows = [json.loads(line) for line in (tmp_path / "out" / family / "metrics.jsonl").read_text().splitlines()]
    assert "val_bpb" in rows[-1] and rows[-1]["step"] == 1
