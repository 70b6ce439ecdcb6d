"""Command line: flag names, switches, presets, config files, layer specs and one-line errors."""
import json
import os
import re
import subprocess
import sys

import pytest

from llm.cli import parse
from llm.config import BlockConfig, ConfigError, eval_int_expr, exit_on_user_error
from llm.model.registry import FFNS, MIXERS
from tests.conftest import REPO

ALL_FLAGS = [
    "--dataset", "tiny", "--total_batch_size_str", "8*1024", "--batch_size", "8", "--max_iters", "7",
    "--learning_rate", "3e-4", "--warmup_steps", "2", "--grad_clip", "0.5", "--act_recomp", "--compile", "--eval",
    "--eval_interval", "3", "--eval_iters", "4", "--save_model", "--ckpt_interval", "5", "--file_name", "m",
    "--wandb_log", "--wandb_project", "p", "--wandb_run_name", "trial_run_w/o_mix", "--n_layer", "3",
    "--n_embd", "64", "--vocab_size", "300", "--block_size", "64", "--dropout", "0.1", "--pos_emb", "rope",
    "--norm", "rms", "--up_dim", "100", "--non_linearity", "swish", "--attn", "gqa", "--n_head", "8",
    "--n_kv_heads", "4", "--q_latent_dim", "16", "--kv_latent_dim", "32", "--rope_head_dim", "8", "--moe",
    "--n_exp", "6", "--n_shared", "1", "--n_act", "2", "--aux_free", "--alpha", "0.001", "--gamma", "0.01",
    "--coeff", "0.02", "--router_score", "sigmoid", "--no_norm_topk", "--min_lr", "1e-5", "--beta1", "0.8",
    "--beta2", "0.99", "--weight_decay", "0.05", "--device", "cuda:1", "--dtype", "bfloat16", "--keep_last", "2",
    "--resume", "latest", "--data_order", "epoch", "--dist", "fsdp",
]


def test_every_flag_parses():
    model, train = parse(ALL_FLAGS)
    assert (train.dataset, train.batch_size, train.max_iters, train.eval_iters) == ("tiny", 8, 7, 4)
    assert train.act_recomp and train.compile and train.eval and train.save_model and train.wandb_log
    assert train.wandb_run_name == "trial_run_w/o_mix" and train.total_batch_size_str == "8*1024"
    assert (model.n_layer, model.n_embd, model.vocab_size, model.pos_emb, model.norm) == (3, 64, 300, "rope", "rms")
    assert len(model.layers) == 3 and all(layer == model.layers[0] for layer in model.layers)
    layer = model.layers[0]
    assert (layer.attn, layer.n_head, layer.n_kv_heads, layer.up_dim, layer.non_linearity) == ("gqa", 8, 4, 100, "swish")
    assert layer.ffn == "moe" and layer.aux_free and (layer.n_exp, layer.n_shared, layer.n_act) == (6, 1, 2)
    assert (layer.alpha, layer.gamma, layer.coeff) == (0.001, 0.01, 0.02)
    assert layer.router_score == "sigmoid" and not layer.norm_topk
    assert (train.min_lr, train.beta1, train.beta2, train.weight_decay) == (1e-5, 0.8, 0.99, 0.05)
    assert (train.device, train.dtype, train.keep_last, train.resume, train.data_order) == \
        ("cuda:1", "bfloat16", 2, "latest", "epoch")
    assert train.dist == "fsdp"
    assert parse(["--init_from", "hf:.", "--no_import_check"])[1].init_from == "hf:."  # the model flags come with it


def test_layer_configs_flag_parses():
    model, _ = parse(["--layer_configs", json.dumps([{"attn": "mha", "n_head": 2, "moe": False, "up_dim": 64,
                                                      "non_linearity": "relu"}] * 2)])
    assert model.n_layer == 2 and model.layers[1].non_linearity == "relu"


def test_switches_and_negations():
    _, train = parse(["--eval", "--no_eval"])
    assert not train.eval
    model, _ = parse(["--no-moe"])
    assert model.layers[0].ffn == "dense"


def test_hyphenated_spellings_are_accepted():
    model, train = parse(["--n-layer", "2", "--learning-rate", "0.01"])
    assert model.n_layer == 2 and train.learning_rate == 0.01


def test_unused_keys_of_other_kinds_are_accepted():
    model, _ = parse(["--attn", "mla", "--n_kv_heads", "3", "--kv_latent_dim", "16", "--pos_emb", "learn"])
    assert model.layers[0].attn == "mla"
    model, _ = parse(["--attn", "gqa", "--n_kv_heads", "2", "--q_latent_dim", "7", "--kv_latent_dim", "9"])
    assert model.layers[0].n_kv_heads == 2
    model, _ = parse(["--n_exp", "2", "--n_act", "5", "--alpha", "0.5"])  # MoE fields ignored without --moe
    assert model.layers[0].ffn == "dense"
    model, _ = parse(["--attn", "mha", "--n_kv_heads", "3"])  # mha uses n_head KV heads


def test_example_jsonl_mixes_attention_and_ffn_kinds():
    model, _ = parse(["--layer_configs_jsonl", str(REPO / "layer_configs.jsonl"), "--pos_emb", "rope"])
    assert [(layer.attn, layer.ffn) for layer in model.layers] == [("mla", "moe"), ("mla", "moe"), ("gqa", "dense"),
                                                                    ("gqa", "dense")]
    assert [layer.aux_free for layer in model.layers[:2]] == [False, True]


def test_jsonl_dense_gqa_line_with_unused_keys(tmp_path):
    line = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "moe": False, "up_dim": 256, "non_linearity": "lrelu",
            "q_latent_dim": 32, "n_exp": 4, "aux_free": True}
    path = tmp_path / "layers.jsonl"
    path.write_text(json.dumps(line) + "\n\n" + json.dumps({**line, "attn": "mqa"}) + "\n")
    model, _ = parse(["--layer_configs_jsonl", str(path), "--n_layer", "2"])
    assert [layer.attn for layer in model.layers] == ["gqa", "mqa"]


def test_jsonl_omitted_optional_keys_come_from_flags(tmp_path):
    path = tmp_path / "layers.jsonl"
    path.write_text(json.dumps({"attn": "gqa", "n_head": 4, "moe": False, "up_dim": 64, "non_linearity": "relu"}))
    model, _ = parse(["--layer_configs_jsonl", str(path), "--n_kv_heads", "2"])
    assert model.layers[0].n_kv_heads == 2


@pytest.mark.parametrize("text,value", [("2**11", 2048), ("8*1024", 8192), ("524288", 524288), ("(2+2)*3//2", 6),
                                        (" 2 ** 3 - 1 ", 7)])
def test_total_batch_expression(text, value):
    assert eval_int_expr(text) == value


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "2.5*4", "2**1000", "1/2", "x", "2**", "1//0",
                                  "[1]", "True"])
def test_total_batch_expression_rejects(text):
    with pytest.raises(ConfigError, match="total_batch_size_str"):
        eval_int_expr(text, "total_batch_size_str")


def test_presets():
    model, _ = parse(["--preset", "gpt2-124m"])
    assert (model.n_layer, model.n_embd, model.layers[0].n_head, model.bias, model.tie_embeddings) == (12, 768, 12, True, True)
    model, train = parse(["--preset", "llama3-8b-genomic"])
    layer = model.layers[0]
    assert (model.vocab_size, model.block_size, model.rope_theta, model.norm, model.tie_embeddings) == \
        (256, 8192, 500000.0, "rms", False)
    assert (layer.attn, layer.n_head, layer.n_kv_heads, layer.up_dim, layer.non_linearity) == ("gqa", 32, 8, 14336, "swiglu")
    model, _ = parse(["--preset", "gpt2-124m", "--n_layer", "2"])
    assert model.n_layer == 2


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_print_config_round_trips(tmp_path, capsys, suffix):
    argv = ["--layer_configs_jsonl", str(REPO / "layer_configs.jsonl"), "--pos_emb", "rope", "--learning_rate", "0.002"]
    with pytest.raises(SystemExit) as exit_info:
        parse(argv + ["--print_config"])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(printed))
    else:
        import yaml
        path.write_text(yaml.safe_dump(printed))
    with pytest.raises(SystemExit):
        parse(["--config", str(path), "--print_config"])
    assert json.loads(capsys.readouterr().out) == printed


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"n_layer": 3, "layers": [{"attn": "mqa", "n_head": 2, "moe": False,
                                                                    "up_dim": 32, "non_linearity": "relu"}] * 3},
                                "train": {"learning_rate": 0.5}}))
    model, train = parse(["--config", str(path), "--n_head", "4", "--max_iters", "9"])
    assert train.learning_rate == 0.5 and train.max_iters == 9
    assert model.n_layer == 3 and all(layer.n_head == 4 and layer.attn == "mqa" for layer in model.layers)


def test_config_file_errors(tmp_path):
    layer = {"attn": "mqa", "n_head": 2, "moe": False, "up_dim": 32, "non_linearity": "relu"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"n_layer": 3, "layers": [layer] * 2}}))
    with pytest.raises(ConfigError, match="model.n_layer=3 but model.layers has 2 specs"):
        parse(["--config", str(path)])
    path.write_text(json.dumps({"model": {"layers": [layer, {**layer, "attn": "mha"}]}}))
    with pytest.raises(ConfigError, match="--n_head cannot change the heterogeneous layers"):
        parse(["--config", str(path), "--n_head", "4"])
    path.write_text(json.dumps({"modle": {}}))
    with pytest.raises(ConfigError, match='unknown top-level key "modle" \\(did you mean "model"\\?\\)'):
        parse(["--config", str(path)])
    path.write_text(json.dumps({"train": {"learning_rat": 0.1}}))
    with pytest.raises(ConfigError, match='unknown key "learning_rat"'):
        parse(["--config", str(path)])


BAD_INPUTS = [
    (["--n_head", "5"], "n_head=5 does not divide n_embd=128"),
    (["--attn", "gqa"], "attn=gqa needs n_kv_heads"),
    (["--attn", "gqa", "--n_head", "4", "--n_kv_heads", "3"], "n_kv_heads=3 does not divide n_head=4"),
    (["--pos_emb", "rope", "--n_embd", "96", "--n_head", "32"], "even head size"),
    (["--n_head", "5", "--head_dim", "0"], "head_dim=0 must be >= 1"),
    (["--pos_emb", "rope", "--n_head", "5", "--head_dim", "7"], "even head size, got 7"),
    (["--attn", "mla"], "attn=mla needs kv_latent_dim"),
    (["--attn", "mla", "--kv_latent_dim", "16", "--pos_emb", "rope"], "needs an even rope_head_dim"),
    (["--attn", "mla", "--kv_latent_dim", "16", "--pos_emb", "rope", "--rope_head_dim", "5"], "rope_head_dim"),
    (["--moe", "--n_exp", "2", "--n_act", "3"], "n_exp >= n_act > n_shared"),
    (["--moe", "--n_shared", "2", "--n_act", "2"], "n_exp >= n_act > n_shared"),
    (["--moe", "--n_act", "2"], "use --no_norm_topk or raise n_act"),
    (["--dropout", "1.5"], "dropout=1.5"),
    (["--n_layer", "-7"], "n_layer=-7 must be >= 1"),
    (["--learning_rate", "inf"], "learning_rate=inf must be a finite number"),
    (["--rope_theta", "nan"], "rope_theta=nan must be a finite number"),
    (["--moe", "--coeff", "-inf"], "coeff=-inf must be a finite number"),
    (["--device", "gpu"], "device='gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    (["--beta2", "1.0"], "beta2=1.0 must be in [0, 1)"),
    (["--min_lr", "0.1"], "min_lr=0.1 must be in [0, learning_rate=0.001]"),
    (["--keep_last", "0"], "keep_last=0 must be >= 1"),
    (["--init_from", "gpt2"], "init_from='gpt2' is not supported; use hf:DIR"),
    (["--init_from", "hf:no/such/dir"], "init_from='hf:no/such/dir': no such directory; pass a transformers model "
                                        "directory on this machine (nothing is downloaded)"),
    (["--batch_size", "3", "--total_batch_size_str", "1000"], "not a positive multiple"),
    (["--total_batch_size_str", "2**11 + exec('x')"], "total_batch_size_str"),
    (["--layer_configs", "[]", "--layer_configs_jsonl", "x.jsonl"], "pass only one"),
    (["--layer_configs_jsonl", "missing.jsonl"], "no such file"),
    (["--layer_configs", "{oops"], "not valid JSON"),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "moe": false, "up_dim": 8, "non_linearty": "relu"}]'],
     'unknown key "non_linearty" (did you mean "non_linearity"?)'),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "moe": false, "up_dim": 8}]'], 'missing required key "non_linearity"'),
    (["--layer_configs", '[{"attn": "mha", "n_head": "4", "moe": false, "up_dim": 8, "non_linearity": "relu"}]'],
     "n_head='4' must be int"),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "moe": 1, "up_dim": 8, "non_linearity": "relu"}]'],
     "moe=1 must be bool"),
    (["--layer_configs", '[{"attn": "gqq", "n_head": 4, "moe": false, "up_dim": 8, "non_linearity": "relu"}]'],
     'did you mean "gqa"'),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "moe": true, "up_dim": 8, "non_linearity": "relu", '
                         '"router_score": "softmx"}]'], 'did you mean "softmax"'),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "moe": false, "up_dim": 8, "non_linearity": "relu"}]',
      "--n_layer", "2"], "n_layer=2 but 1 layer specs"),
    (["--config", "nope.yaml"], "no such file"),
    (["--max_iters", "20", "--warmup_steps", "30"], "warmup_steps=30 must be in [0, max_iters=20]; pass "
                                                    "--warmup_steps 2 (a tenth of the run, its default)"),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "n_head": 2, "ffn": "dense", "up_dim": 8, '
                         '"non_linearity": "relu"}]'], 'key "n_head" appears twice'),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "n_embd": 64, "ffn": "dense", "up_dim": 8, '
                         '"non_linearity": "relu"}]'], '"n_embd" is set for the whole model or run, not per layer'),
    (["--wandb_run_name", ".."], "wandb_run_name='..' names no directory"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_jsonl_errors_name_file_line_and_key(tmp_path):
    good = {"attn": "mha", "n_head": 4, "moe": False, "up_dim": 8, "non_linearity": "relu"}
    path = tmp_path / "layers.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "n_exps": 3}) + "\n")
    with pytest.raises(ConfigError, match=r'layers.jsonl line 2: unknown key "n_exps" \(did you mean "n_exp"\?\)'):
        parse(["--layer_configs_jsonl", str(path)])
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "n_head": 3}) + "\n")
    with pytest.raises(ConfigError, match="layers.jsonl line 2: n_head=3 does not divide n_embd=128"):
        parse(["--layer_configs_jsonl", str(path)])


def test_flash_backend_requires_flash_attn():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="flash-attn is not installed"):
            parse(["--attn_backend", "flash"])
    else:
        parse(["--attn_backend", "flash"])


@pytest.mark.parametrize("argv,needle", [(["--n_head", "5"], "error: n_head=5"), (["--attn", "foo"], "--attn")])
def test_entry_point_exits_2_without_traceback(argv, needle):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_block_config_defaults_make_moe_valid():
    block = BlockConfig(ffn="moe")
    assert block.n_exp >= block.n_act > block.n_shared >= 0


@pytest.mark.parametrize("attn", ["mha", "mqa", "gqa", "mla"])
def test_single_run_script_passes_every_flag(attn):
    env = {**os.environ, "ATTN": attn}
    result = subprocess.run(["bash", str(REPO / "scripts" / "train_single.sh"), "--print_config"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    layers = json.loads(result.stdout)["model"]["layers"]
    assert len(layers) == 4 and all(layer["attn"] == attn for layer in layers)


def test_moe_is_a_spelling_of_ffn_everywhere(tmp_path, capsys):
    assert parse(["--moe"])[0].layers[0].ffn == "moe" and parse(["--ffn", "moe", "--moe"])[0].layers[0].ffn == "moe"
    assert parse(["--no_moe"])[0].layers[0].ffn == "dense"
    spec = {"attn": "mha", "n_head": 4, "moe": True, "up_dim": 8, "non_linearity": "relu"}
    assert parse(["--layer_configs", json.dumps([spec])])[0].layers[0].ffn == "moe"
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"layers": [spec, {**spec, "moe": False}]}}))
    assert [b.ffn for b in parse(["--config", str(path)])[0].layers] == ["moe", "dense"]
    with pytest.raises(SystemExit):
        parse(["--moe", "--print_config"])
    printed = json.loads(capsys.readouterr().out)["model"]["layers"][0]
    assert printed["ffn"] == "moe" and "moe" not in printed


@pytest.mark.parametrize("argv,message", [
    (["--ffn", "dense", "--moe"], "--ffn dense contradicts --moe; pass only one of them"),
    (["--moe", "--no-moe"], "--moe contradicts --no-moe"),
    (["--layer_configs", '[{"attn": "mha", "n_head": 4, "moe": true, "ffn": "dense", "up_dim": 8, '
                         '"non_linearity": "relu"}]'], '"moe": true contradicts "ffn": "dense"; keep only "ffn"'),
    (["--ffn", "mo"], f"ffn='mo' is not a registered kind; use --ffn with one of {', '.join(FFNS)}"),
    (["--attn", "gqq"], f"attn='gqq' is not a registered kind; use --attn with one of {', '.join(MIXERS)} "
                        '(did you mean "gqa"?)'),
    (["--objective", "ntp"], "objective='ntp' is not a registered kind"),
])
def test_kind_names_and_their_spellings_are_checked(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(argv)


def test_n_layer_cannot_change_the_heterogeneous_layers_of_a_config_file(tmp_path):
    spec = dict(attn="mha", n_head=2, ffn="dense", up_dim=64, non_linearity="gelu")
    layers = [spec, {**spec, "non_linearity": "relu"}] * 2
    (tmp_path / "four.json").write_text(json.dumps({"model": {"n_embd": 32, "layers": layers}}))
    with pytest.raises(ConfigError, match="^--n_layer 2 cannot change the 4 heterogeneous layers of --config"):
        parse(["--config", str(tmp_path / "four.json"), "--n_layer", "2"])
    assert parse(["--config", str(tmp_path / "four.json"), "--n_layer", "4"])[0].n_layer == 4


@pytest.mark.parametrize("flag,name", [("--config", "bad.json"), ("--config", "bad.yaml"),
                                       ("--layer_configs_jsonl", "bad.jsonl")])
def test_a_file_that_is_not_utf8_is_a_one_line_error(tmp_path, flag, name):
    (tmp_path / name).write_bytes(b'{"model": {"n_layer": 2}}\xff\xfe')
    with pytest.raises(ConfigError, match=rf"^{flag}=.*: .*{name} is not UTF-8 text \(byte 25 is 0xff\)"):
        parse([flag, str(tmp_path / name)])


def test_an_out_dir_that_names_a_file_is_refused_before_training(tmp_path, char_data):
    from llm.train import train

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match=r"^--out_dir='.*taken': .*taken is a file, not a folder"):
        train(*parse(["--out_dir", str(tmp_path / "taken"), "--data_dir", str(char_data.parent), "--max_iters", "1"]))


def test_help_narrowed_to_a_term_lists_only_the_flags_that_mention_it(capsys):
    with pytest.raises(SystemExit) as exited:
        parse(["--help", "moe"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    flags = {line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  -")}
    assert {"--ffn", "--n_exp", "--n_act", "--aux_free"} <= flags
    assert not flags & {"--n_embd", "--learning_rate", "--attn"}
    assert "layer options:" in text
    with pytest.raises(SystemExit):
        parse(["-h", "Muon"])  # case-insensitive, and -h works too
    assert "--muon_lr" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no flag of train.py mentions 'zzz'"):
        parse(["--help", "zzz"])
