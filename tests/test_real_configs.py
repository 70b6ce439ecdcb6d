"""The reference systems' real config files, copied as they are: every family file of the modded-nanogpt configs
repository (tests/data/modded_nanogpt_23cea17, with the training.yaml and data.yaml they compose) and llm720's two
configs (tests/data/llm720) convert without --lenient, read back the same through our format, and train at a CPU
size; the one that asks for what no model here computes is refused with the reason."""
import json

import pytest

from llm.cli import parse
from llm.config import ConfigError, config_dict
from llm.formats.convert import main as convert_main
from llm.train import train
from tests.conftest import REPO

CONFIGS = REPO / "tests" / "data" / "modded_nanogpt_23cea17"
LLM720 = REPO / "tests" / "data" / "llm720"
FAMILIES = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in ("training", "data", "config"))
BYTE_FAMILIES = ("megabyte", "hnet", "hnet_x_nsa")  # trained on bytes in test_byte_configs.py (the same files)
TINY = ["--block_size", "32", "--batch_size", "2", "--total_batch_size_str", "64", "--max_iters", "2",
        "--eval_iters", "1", "--no_compile", "--no_wandb_log", "--no_save_model", "--vocab_size", "65"]
SHRUNK = {"megabyte": ["--n_embd", "32", "--global_byte_embd", "8", "--patch_size", "4"]}  # else --n_embd 48
UNIFORM = ("--up_dim", "96")  # the MLP width of the families whose layers are one spec repeated


def test_the_seventeen_family_files_are_here():
    assert len(FAMILIES) == 17


def flags(family: str, data, out) -> list[str]:
    """The file's model at a CPU test's size: its layer kinds, heads and depths as they are, narrower."""
    shrink = SHRUNK.get(family, ["--n_embd", "48"])
    uniform = [] if family in (*BYTE_FAMILIES, "current_best_gpt", "mamba") else list(UNIFORM)
    return [*shrink, *uniform, *TINY, "--dataset", data.name, "--data_dir", str(data.parent), "--out_dir", str(out),
            "--wandb_run_name", family]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in BYTE_FAMILIES and f != "sedd"])
def test_each_family_file_converts_and_trains(family, char_data, tmp_path, capsys):
    assert_converts_and_trains(str(CONFIGS / f"{family}.yaml"), flags(family, char_data, tmp_path / "out"), tmp_path,
                               family)
    assert "cannot map" not in capsys.readouterr().err


def test_sedd_is_refused_for_its_next_token_loss():
    """Their SEDD adds a next-token loss of a causal denoiser (lm_loss_weight 1.0); SEDD here is bidirectional."""
    with pytest.raises(ConfigError, match=r"model_cfg.lm_loss_weight \(1.0; SEDD's loss is score entropy alone"):
        parse(["--config", str(CONFIGS / "sedd.yaml")])
    model, _ = parse(["--config", str(CONFIGS / "sedd.yaml"), "--lenient"])
    assert model.objective == "sedd"


def test_what_the_files_mean_is_said(capsys):
    """The data and environment keys are noted, not refused; keys read with a meaning of ours say which."""
    model, run = parse(["--config", str(CONFIGS / "current_best_gpt.yaml")])
    err = capsys.readouterr().err
    assert "modal_data_path=/root/data/data/project (their container's data folder" in err
    assert "local_data_path" not in err  # null: nothing to say
    assert (model.block_size, run.total_batch_size_str, run.eval_iters) == (65536, "65536", 160)  # data.yaml's
    model, _ = parse(["--config", str(CONFIGS / "moe.yaml")])
    assert model.layers[0].router_z_loss == 0.001
    assert "model_cfg.beta=0.001: --router_z_loss, ST-MoE's router z-loss" in capsys.readouterr().err
    model, _ = parse(["--config", str(CONFIGS / "rd.yaml")])
    assert (model.n_layer, model.n_prelude, model.n_core, model.n_coda) == (8, 2, 4, 2)
    assert "model_cfg.n_layers=12 (their recurrent-depth model builds l_p + l_core + l_c = 8" in capsys.readouterr().err
    parse(["--config", str(CONFIGS / "mamba.yaml")])
    assert "model_cfg.initializer_range=0.1 (their models/Mamba.py initialises" in capsys.readouterr().err


def test_current_best_gpt_is_the_record_gpt():
    model, run = parse(["--config", str(CONFIGS / "current_best_gpt.yaml")])
    assert (model.value_embeds, model.x0_mix, model.unet_skips, model.logit_softcap, model.window_unit,
            model.tie_embeddings) == (3, True, True, 15.0, 128, False)
    assert [b.window // 128 for b in model.layers] == [14, 7, 7, 7, 14, 7, 7, 14, 7, 7, 7, 14]
    assert {(b.non_linearity, b.up_dim, b.n_head, b.qk_norm) for b in model.layers} == {("relu2", 3072, 6, True)}
    assert (run.window_schedule, run.window_max, run.window_block, run.optimizer) == ("scaled", 1792, 128, "muon")


def assert_converts_and_trains(path: str, run_flags: list[str], tmp_path, run_name: str) -> None:
    """The file reads back the same through our format and trains two steps with `run_flags`."""
    ours = tmp_path / "ours.yaml"
    convert_main([path, "--out", str(ours)])
    assert config_dict(*parse(["--config", str(ours), *run_flags])) == config_dict(*parse(["--config", path,
                                                                                           *run_flags]))
    train(*parse(["--config", path, *run_flags]))
    rows = [json.loads(line) for line in (tmp_path / "out" / run_name / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and "val_loss" in rows[-1]


def test_llm720_dry_run_config_converts_and_trains(char_data, tmp_path, capsys):
    """As it is but for the data, the warm-up (a tenth of its 5,000 steps) and fp16 (a GPU's): its wikitext source
    is noted with the command that prepares it."""
    path = str(LLM720 / "dry_run_config.yaml")
    run_flags = [*TINY, "--dataset", char_data.name, "--data_dir", str(char_data.parent), "--out_dir",
                 str(tmp_path / "out"), "--wandb_run_name", "dry", "--warmup_steps", "0", "--dtype", "float32"]
    assert_converts_and_trains(path, run_flags, tmp_path, "dry")
    err = capsys.readouterr().err
    assert "python -m llm.data.prepare text --source wikitext2_dry_run.jsonl --text_field text" in err
    assert "cannot map" not in err


def test_llm720_config_converts_with_its_mix_and_notes(capsys):
    """The full config (1,048,576 PEER experts: too large to train on a CPU test) converts, its mix and notes said."""
    model, run = parse(["--config", str(LLM720 / "config.yaml")])
    assert [b.ffn for b in model.layers] == ["dense"] * 2 + ["peer"] * 10
    assert (model.layers[2].num_experts, model.layers[0].q_latent_dim, model.block_size) == (1048576, 192, 2048)
    assert (run.data_mix, run.total_batch_size_str, run.dtype) == ("pile:0.7,c4:0.2,code_alpaca:0.1", "16*4*2048",
                                                                   "float16")
    err = capsys.readouterr().err
    for said in ("train_config.per_device_eval_batch_size=16", "train_config.log_level=info",
                 "train_config.tf32=False", "--source pile.jsonl --text_field text --out data/pile",
                 "--text_field instruction --out data/code_alpaca", "python -m llm.eval lm_eval --ckpt OUT_DIR/RUN "
                 "--tasks hellaswag,mmlu,truthfulqa,gsm8k,humaneval", "wandb_config.entity=wryanmedford"):
        assert said in err
