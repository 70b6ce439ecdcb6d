"""--config with the reference systems' own files (transformers config.json, HELM, llm720, Hydra) and the converter
to our format: each realistic file maps to the expected fields, unmappable keys are refused together (or ignored
with --lenient), and converting to our format reads back to the same resolved config."""
import dataclasses
import json

import pytest
import yaml

from llm.cli import parse
from llm.config import ConfigError, config_dict
from llm.formats.convert import main as convert_main
from llm.train import train

GENOMIC_LLAMA = {  # bionemo's OpenGenome2 Llama-3 config.json
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "num_hidden_layers": 32,
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "eos_token_id": 0, "bos_token_id": None,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}
HELM_GPT2 = {"model_type": "transformer", "mode": "mlm", "tokenizer": "3mer", "helm": False,
             "model_config": {"model": "gpt2", "d_model": 640, "n_layer": 10, "d_intermediate": 2560,
                              "pos_embedding": "absolute", "max_position_embeddings": 2048, "bidirectional": True}}
LLM720 = {
    "model_config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
                     "vocab_size": 1000, "max_position_embeddings": 512, "initializer_range": 0.02,
                     "layer_norm_eps": 1e-6, "use_peer": True, "peer_start_layer": 2,
                     "peer_config": {"num_experts": 64, "num_experts_per_tok": 4, "num_heads": 2,
                                     "expert_hidden_size": 1, "product_key_dim": [8, 8], "query_dim": 32,
                                     "batch_norm_query": True, "log_freq": 500, "usage_threshold": 4.0},
                     "mla_config": {"q_lora_rank": 96, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
                                    "v_head_dim": 64, "qk_nope_head_dim": 64, "rope_theta": 10000.0}},
    "train_config": {"output_dir": "./output", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
                     "learning_rate": 5e-5, "weight_decay": 0.01, "max_grad_norm": 1.0, "max_steps": 1000,
                     "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "logging_steps": 100, "save_steps": 200,
                     "eval_steps": 100, "seed": 42, "fp16": False, "bf16": True, "resume_from_checkpoint": None},
    "dataset_config": {"datasets": [{"name": "pile", "weight": 0.7}, {"name": "c4", "weight": 0.2},
                                    {"name": "code_alpaca", "weight": 0.1}], "max_seq_length": 512},
    "wandb_config": {"project": "foundation-model-training", "name": "lm-training-peer-mla"},
}
TRAINING_YAML = {"num_iterations": 1393, "cooldown_frac": 0.4, "type": "current-best", "model_adapter": None,
                 "num_layers": 12, "model_dim": 768,
                 "n_mtp_tokens": 2, "use_liger": True, "torch_compile": True, "proj_fp8": False, "BLOCK_SIZE": 128,
                 "use_deepseek_mtp": True, "sliding_window_size": None, "num_selected_blocks": None,
                 "compress_block_size": None, "selection_block_size": None, "model_cfg": None}
FIT = ("--batch_size", "1", "--total_batch_size_str", "2**13")
"""Batch flags that fit a context of up to 8192 tokens (the tiny preset's batch is for 128)."""
SHARED = {"vocab_size": 50257, "n_ctx": 1024, "d_model": 768, "num_heads": 6, "n_layers": 12}
HYDRA_FAMILIES = {
    "gpt2": {}, "vanilla": {}, "current_best_gpt": {}, "ngpt": {},
    "mtp": {"n_mtp_tokens": 2, "use_deepseek_mtp": False},
    "mtm": {"n_mtp_modules": 2, "mtp_lambda": 0.1},
    "nsa": {"sliding_window_size": 32, "compress_block_size": 4, "selection_block_size": 4, "num_selected_blocks": 4},
    "mod": {"capacity": 0.125, "every_other": False},
    "moe": {"num_experts": 8, "top_k": 2, "jitter_noise": 0.0, "alpha": 0.01, "gate_type": "mixtral"},
    "rd": {"n_layers": 8, "l_p": 2, "l_core": 4, "l_c": 2, "mean_recurrence": 32, "lognorm_var": 3.0, "k_trunc": 8,
           "s0_std": 0.02, "r_max": 64, "eval_recurrence": 32, "adapter_mode": "concat"},
    "mamba": {"d_state": 16, "expand": 2, "d_conv": 4, "time_step_rank": "auto", "time_step_min": 0.001,
              "time_step_max": 0.1, "time_step_init_scheme": "random", "time_step_floor": 1e-4, "use_conv_bias": True,
              "residual_in_fp32": True},
}


def write(path, data):
    """Writes `data` as JSON or YAML by the file's suffix and returns the path as a string."""
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return str(path)


def round_trip(tmp_path, path, *flags):
    """The resolved config of `path`, and of its conversion to our format read back; both must agree."""
    direct = config_dict(*parse(["--config", path, *flags]))
    ours = tmp_path / "ours.yaml"
    lenient = [f for f in flags if f == "--lenient"]
    convert_main([path, "--out", str(ours), *lenient])
    assert config_dict(*parse(["--config", str(ours), *[f for f in flags if f != "--lenient"]])) == direct
    return parse(["--config", path, *flags])


def hydra_folder(tmp_path, family, extra=None):
    """A modded-nanogpt config folder: training.yaml and FAMILY.yaml composing it."""
    write(tmp_path / "training.yaml", TRAINING_YAML)
    body = {"defaults": ["training"], "model_cfg": {**SHARED, **HYDRA_FAMILIES[family], **(extra or {})},
            "train_seq_len": 1024, "num_iterations": 1750}
    return write(tmp_path / f"{family}.yaml", body)


def test_genomic_llama_config_json_is_the_genomic_preset_model(tmp_path):
    path = write(tmp_path / "config.json", GENOMIC_LLAMA)
    model, _ = round_trip(tmp_path, path, "--preset", "llama3-8b-genomic")
    preset_model, _ = parse(["--preset", "llama3-8b-genomic"])
    assert model == preset_model
    tiny_model, _ = parse(["--config", path, *FIT])  # the file decides the architecture whatever the preset
    assert dataclasses.replace(tiny_model, emb_init_std=1.0) == preset_model


def test_config_json_refuses_what_the_import_drops(tmp_path, capsys):
    bad = dict(GENOMIC_LLAMA, hidden_act="gelu", head_dim=64, hidden_sizes=3)
    path = write(tmp_path / "config.json", bad)
    with pytest.raises(ConfigError) as e:
        parse(["--config", path, *FIT])
    assert all(key in str(e.value) for key in ("hidden_act", "hidden_sizes")) and "head_dim" not in str(e.value)
    model, _ = parse(["--config", path, "--lenient", *FIT])
    assert model.n_embd == 4096 and "ignored" in capsys.readouterr().err
    assert model.layers[0].head_dim == 64  # mapped: 32 heads of 64 at width 4096


def test_helm_gpt2_mlm_is_the_helm_preset(tmp_path):
    path = write(tmp_path / "helm.json", HELM_GPT2)
    model, train = round_trip(tmp_path, path, "--preset", "helm-gpt2-mlm")
    preset_model, preset_train = parse(["--preset", "helm-gpt2-mlm"])
    assert model == preset_model and train == preset_train
    model, train = parse(["--config", write(tmp_path / "h.json", dict(HELM_GPT2, helm=True)), *FIT])
    assert (model.loss, model.objective, train.dataset, model.layers[0].n_head) == ("hxe", "mlm", "genomic_3mer", 10)


@pytest.mark.parametrize("kind,mode,attn,ffn", [("mamba", "mlm", "bimamba", "none"), ("mamba", "clm", "mamba", "none"),
                                                ("hyena", "clm", "hyena", "dense")])
def test_helm_state_space_and_hyena(tmp_path, kind, mode, attn, ffn):
    cfg = {"model": kind, "d_model": 128, "n_layer": 3, "d_intermediate": 0 if kind == "mamba" else 256,
           "pos_embedding": "none", "max_position_embeddings": 256, "bidirectional": mode == "mlm"}
    path = write(tmp_path / "helm.yaml", {"model_type": kind, "mode": mode, "tokenizer": "nuc", "model_config": cfg})
    model, train = round_trip(tmp_path, path, *FIT)
    assert [(b.attn, b.ffn) for b in model.layers] == [(attn, ffn)] * 3
    assert (model.objective, model.n_embd, model.block_size, train.dataset) == (mode, 128, 256, "genomic_nuc")


def test_helm_refuses_unknown_keys_together(tmp_path):
    data = dict(HELM_GPT2, optimizer="adam", model_config=dict(HELM_GPT2["model_config"], n_head=8))
    with pytest.raises(ConfigError, match="optimizer.*model_config.n_head"):
        parse(["--config", write(tmp_path / "helm.json", data), *FIT])


def test_llm720_yaml_maps_model_run_and_mix(tmp_path):
    model, train = round_trip(tmp_path, write(tmp_path / "llm720.yaml", LLM720))
    assert [b.ffn for b in model.layers] == ["dense", "dense", "peer", "peer"]
    first, peer = model.layers[0], model.layers[2]
    assert (first.attn, first.q_latent_dim, first.kv_latent_dim, first.rope_head_dim) == ("mla", 96, 32, 16)
    assert (peer.num_experts, peer.product_key_dim, peer.query_dim, peer.num_heads) == (64, [8, 8], 32, 2)
    assert (model.n_embd, model.block_size, model.vocab_size, model.norm_eps) == (256, 512, 1000, 1e-6)
    assert train.data_mix == "pile:0.7,c4:0.2,code_alpaca:0.1"
    assert (train.batch_size, train.total_batch_size_str, train.max_iters, train.warmup_steps) == (8, "8*4*512", 1000,
                                                                                                     100)
    assert (train.dtype, train.min_lr, train.eval_interval, train.peer_log_interval) == ("bfloat16", 0.0, 100, 500)
    assert (train.wandb_log, train.wandb_run_name, train.out_dir) == (True, "lm-training-peer-mla", "./output")


def test_llm720_maps_mla_head_sizes_and_refuses_unknown_keys(tmp_path, capsys):
    data = json.loads(json.dumps(LLM720))
    data["model_config"]["mla_config"].update(v_head_dim=128, qk_nope_head_dim=96)
    model, _ = parse(["--config", write(tmp_path / "sizes.yaml", data)])
    assert {(b.v_head_dim, b.qk_nope_head_dim) for b in model.layers} == {(128, 96)}
    data["train_config"]["tf32"] = True
    data["train_config"]["label_smoothing_factor"] = 0.1
    path = write(tmp_path / "llm720.yaml", data)
    with pytest.raises(ConfigError) as e:
        parse(["--config", path])
    for key in ("train_config.tf32 (true; TF32 has no setting here", "train_config.label_smoothing_factor"):
        assert key in str(e.value)
    parse(["--config", path, "--lenient"])
    assert "train_config.tf32" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(HYDRA_FAMILIES))
def test_hydra_families(tmp_path, family):
    model, train = round_trip(tmp_path, hydra_folder(tmp_path, family))
    block = model.layers[0]
    assert (train.optimizer, train.lr_schedule, train.max_iters, train.cooldown_frac) == ("muon", "trapezoid", 1750,
                                                                                          0.4)
    assert (model.n_embd, model.block_size, model.vocab_size, block.n_head) == (768, 1024, 50257, 6)
    expected = {
        "gpt2": lambda: model.pos_emb == "learn" and block.attn == "mha",
        "vanilla": lambda: model.pos_emb == "learn",
        "current_best_gpt": lambda: (model.pos_emb, model.norm, block.non_linearity, model.x0_mix) == (
            "rope", "rms", "relu2", True),
        "ngpt": lambda: model.arch == "ngpt",
        "mtp": lambda: (model.mtp, model.n_mtp_tokens) == ("parallel", 2),
        "mtm": lambda: (model.mtp, model.n_mtp_tokens, model.mtp_lambda) == ("sequential", 2, 0.1),
        "nsa": lambda: (block.attn, block.sliding_window_size, block.num_selected_blocks) == ("nsa", 32, 4),
        "mod": lambda: all(b.mod for b in model.layers) and not model.mod_every_other,
        "moe": lambda: (block.ffn, block.n_exp, block.n_act, block.n_shared, block.router_score) == ("moe", 8, 2, 0,
                                                                                                      "mixtral"),
        "rd": lambda: (model.arch == "recurrent", model.n_prelude, model.n_core, model.n_coda, model.lognorm_var) == (
            True, 2, 4, 2, 3.0),
        "mamba": lambda: (block.attn, block.ffn, model.pos_emb, block.d_state) == ("mamba", "none", "none", 16),
    }[family]
    assert expected()


def test_hydra_refuses_unknown_families_and_unmappable_keys(tmp_path):
    write(tmp_path / "training.yaml", TRAINING_YAML)
    path = write(tmp_path / "bytes.yaml", {"defaults": ["training"], "model_cfg": {"vocab_size": 258}})
    with pytest.raises(ConfigError, match="model family 'bytes' is unknown; name the file or model_cfg.type one of"):
        parse(["--config", path])
    path = hydra_folder(tmp_path, "moe", {"gate_norm_factor": 2.0})
    with pytest.raises(ConfigError, match="model_cfg.gate_norm_factor"):
        parse(["--config", path])


DIFFUSION_FILES = {  # the configs repository's d3pm.yaml, mdl.yaml and sedd.yaml model_cfg sections, as they are
    "d3pm": {"transition_type": "absorbing", "noise_schedule": "cosine", "absorbing_state_idx": -1,
             "num_timesteps": 1000, "auxiliary_loss_weight": 0.01, "sampling_timesteps": 1000,
             "gaussian_beta_min": 1e-4, "gaussian_beta_max": 0.02, "nearest_neighbors": 5},
    "mdl": {"alpha_type": "cosine", "alpha_min": 0.001, "alpha_max": 1.0, "continuous_time": True,
            "use_subs_parameterization": True, "num_sampling_steps": 100, "use_low_discrepancy_sampler": True,
            "sar_chunk_size": 512},
    "sedd": {"transition_type": "absorbing", "noise_schedule": "mutual_info", "num_timesteps": 1000,
             "absorbing_state_idx": -1, "lm_loss_weight": 1.0, "se_loss_weight": 1.0},
}


def diffusion_file(tmp_path, family, **changes):
    write(tmp_path / "training.yaml", TRAINING_YAML)
    body = {"defaults": ["training"], "model_cfg": {**SHARED, **DIFFUSION_FILES[family], **changes},
            "train_seq_len": 1024, "num_iterations": 1750}
    return write(tmp_path / f"{family}.yaml", body)


def test_the_diffusion_families_map_onto_the_papers_and_train(tmp_path, char_data, capsys):
    model, train_config = parse(["--config", diffusion_file(tmp_path, "d3pm")])
    assert (model.objective, model.diffusion_graph, model.noise_schedule, model.diffusion_steps, model.hybrid_weight,
            model.pos_emb, model.layers[0].non_linearity) == ("d3pm", "absorbing", "cosine", 1000, 0.01, "learn",
                                                             "gelu_tanh")
    assert "model_cfg.sampling_timesteps=1000 (a sampling setting: pass --steps to sample.py)" in capsys.readouterr().err
    model, train_config = parse(["--config", diffusion_file(tmp_path, "mdl")])
    assert (model.objective, model.noise_schedule, model.noise_eps, train_config.antithetic_time) == (
        "mdlm", "cosinesqr", 0.001, True)
    with pytest.raises(ConfigError, match=r"model_cfg.lm_loss_weight \(1.0; SEDD's loss is score entropy alone"):
        parse(["--config", diffusion_file(tmp_path, "sedd")])
    model, _ = parse(["--config", diffusion_file(tmp_path, "sedd"), "--lenient"])
    assert (model.objective, model.diffusion_graph, model.noise_schedule) == ("sedd", "absorbing", "loglinear")
    model, _ = parse(["--config", diffusion_file(tmp_path, "sedd", lm_loss_weight=0.0)])
    assert model.objective == "sedd"
    for family, change, message in (("d3pm", {"absorbing_state_idx": 50256}, "the \\[MASK\\] is an added id"),
                                    ("d3pm", {"transition_type": "gaussian"}, "the graphs here are absorbing and"),
                                    ("mdl", {"continuous_time": False}, "discrete-time masked diffusion is")):
        with pytest.raises(ConfigError, match=message):
            parse(["--config", diffusion_file(tmp_path, family, **change)])
    tiny = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--vocab_size", "65",
            "--batch_size", "2", "--total_batch_size_str", "64", "--max_iters", "2", "--eval_interval", "2",
            "--eval_iters", "2", "--no_compile", "--no_wandb_log", "--no_save_model", "--data_dir",
            str(char_data.parent), "--out_dir", str(tmp_path / "out")]
    for family in DIFFUSION_FILES:
        lenient = ["--lenient"] if family == "sedd" else []
        train(*parse(["--config", diffusion_file(tmp_path, family), *lenient, *tiny, "--wandb_run_name", family]))
        rows = (tmp_path / "out" / family / "metrics.jsonl").read_text().splitlines()
        assert "val_ppl_bound" in json.loads(rows[-1])


def test_unrecognised_file_is_read_as_ours(tmp_path):
    with pytest.raises(ConfigError, match='unknown top-level key "hidden"'):
        parse(["--config", write(tmp_path / "x.yaml", {"hidden": 3})])
