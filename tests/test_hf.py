"""Export to and import from transformers, checked by logit parity; refusals name the blocking feature."""
import dataclasses
import json
from dataclasses import replace

import pytest
import tiktoken
import torch
import transformers

import llm.hf as hf_package
from llm.checkpoint import best_or_latest, read_weights
from llm.cli import parse
from llm.config import BlockConfig, ConfigError, LLMconfig
from llm.export import export
from llm.hf import FAMILIES as REGISTERED
from llm.hf import common, config_from_hf, family, from_hf, hf_config, to_hf
from llm.hf.common import IGNORED_EVERYWHERE, MAPPED_EVERYWHERE, saved_tensors, weight_pairs
from llm.model import LLM, build_model
from llm.model.ffn.moe import MoE
from llm.model.kinds import MixerKind
from llm.model.mixers import gqa
from llm.model.registry import MIXERS, register_mixer
from llm.train import train
from tests.conftest import make_config

MLA = dict(attn="mla", n_head=4, kv_latent_dim=16, rope_head_dim=8, q_latent_dim=24, non_linearity="swiglu", up_dim=64)
MOE = dict(MLA, up_dim=32, ffn="moe", n_exp=6, n_shared=1, n_act=3, router_score="sigmoid", aux_free=True)
DEEPSEEK_V3_DENSE = dict(attn="mla", n_head=4, q_latent_dim=192, kv_latent_dim=512, rope_head_dim=64,
                         qk_nope_head_dim=128, v_head_dim=128, rope_interleave=True, non_linearity="swiglu", up_dim=128)
DEEPSEEK_V3_MOE = dict(DEEPSEEK_V3_DENSE, ffn="moe", up_dim=32, n_exp=33, n_shared=1, n_act=9, router_score="sigmoid",
                       aux_free=True, n_group=8, topk_group=4, routed_scaling_factor=2.5)
"""DeepSeek-V3's head dimensions, latent width, groups and routing at a small width (n_embd 256: 64 per head)."""
GQA = dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity="swiglu", up_dim=64, qkv_bias=True)
MIXTRAL_MOE = dict(GQA, qkv_bias=False, ffn="moe", n_exp=4, n_shared=0, n_act=2, router_score="mixtral", up_dim=32)
FAMILIES = {
    "gpt2": (make_config(dict(attn="mha", n_head=4, non_linearity="gelu_tanh", up_dim=64), bias=True),
             transformers.GPT2LMHeadModel),
    "gpt2-untied-no-bias-gelu": (make_config(dict(attn="mha", n_head=4, non_linearity="gelu", up_dim=64),
                                             tie_embeddings=False), transformers.GPT2LMHeadModel),
    "llama-gqa": (make_config(dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity="swiglu", up_dim=64),
                              pos_emb="rope", norm="rms", rope_theta=5e5), transformers.LlamaForCausalLM),
    "llama-mqa-untied-bias": (make_config(dict(attn="mqa", n_head=4, non_linearity="swiglu", up_dim=64),
                                          pos_emb="rope", norm="rms", bias=True, tie_embeddings=False),
                              transformers.LlamaForCausalLM),
    "deepseek-v3-moe": (make_config([MLA, MOE, MOE], pos_emb="rope", norm="rms", norm_eps=1e-6,
                                    tie_embeddings=False), transformers.DeepseekV3ForCausalLM),
    "deepseek-v3-dense-no-q-latent": (make_config(dict(MLA, q_latent_dim=None), pos_emb="rope", norm="rms",
                                                  norm_eps=1e-6), transformers.DeepseekV3ForCausalLM),
    "deepseek-v3-real-head-dims-groups": (make_config([DEEPSEEK_V3_DENSE, DEEPSEEK_V3_MOE, DEEPSEEK_V3_MOE], n_embd=256,
                                                      pos_emb="rope", norm="rms", norm_eps=1e-6, tie_embeddings=False),
                                          transformers.DeepseekV3ForCausalLM),
    "qwen2-qkv-bias-window": (make_config([GQA, dict(GQA, window=5)], pos_emb="rope", norm="rms", rope_theta=1e6),
                              transformers.Qwen2ForCausalLM),
    "qwen2-untied-no-window": (make_config(GQA, pos_emb="rope", norm="rms", tie_embeddings=False),
                               transformers.Qwen2ForCausalLM),
    "qwen3-qk-norm-untied": (make_config(dict(GQA, qkv_bias=False, qk_norm=True), pos_emb="rope", norm="rms",
                                         tie_embeddings=False), transformers.Qwen3ForCausalLM),
    "qwen3-wide-heads": (make_config(dict(GQA, qkv_bias=False, qk_norm=True, head_dim=20), pos_emb="rope", norm="rms"),
                         transformers.Qwen3ForCausalLM),  # 4 heads of 20 at width 48, as Qwen3-0.6B's 16 of 128
    "llama-narrow-heads": (make_config(dict(attn="gqa", n_head=6, n_kv_heads=3, head_dim=6, non_linearity="swiglu",
                                            up_dim=64), pos_emb="rope", norm="rms"), transformers.LlamaForCausalLM),
    "mistral-window": (make_config(dict(GQA, qkv_bias=False, window=6), pos_emb="rope", norm="rms"),
                       transformers.MistralForCausalLM),
    "mistral-window-wide-heads": (make_config(dict(GQA, qkv_bias=False, window=6, head_dim=16), pos_emb="rope",
                                              norm="rms"), transformers.MistralForCausalLM),
    "mixtral": (make_config(MIXTRAL_MOE, pos_emb="rope", norm="rms", tie_embeddings=False),
                transformers.MixtralForCausalLM),
    "mixtral-window-tied-top3": (make_config(dict(MIXTRAL_MOE, window=6, n_exp=5, n_act=3, up_dim=16), pos_emb="rope",
                                             norm="rms"), transformers.MixtralForCausalLM),
    "mamba": (make_config(dict(attn="mamba", ffn="none", d_state=4), pos_emb="none", norm="rms"),
              transformers.MambaForCausalLM),
    "mamba-untied-bias-rank2-no-conv-bias": (make_config(dict(attn="mamba", ffn="none", d_state=4, dt_rank=2,
                                                              conv_bias=False), pos_emb="none", norm="rms", bias=True,
                                                         tie_embeddings=False), transformers.MambaForCausalLM),
}


def logit_difference(ours: LLM, theirs: torch.nn.Module, vocab: int) -> float:
    idx = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        return (ours.eval()(idx).logits - theirs.eval()(input_ids=idx).logits).abs().max().item()


def with_random_biases(model: LLM) -> LLM:
    """Spread-out router weights and nonzero MoE selection biases (where aux_free), so that export must carry them."""
    for moe in [block.ffn for block in model.blocks if isinstance(block.ffn, MoE)]:
        moe.router.gate.weight.data.normal_(std=0.3)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.copy_(torch.randn_like(moe.router.expert_bias) * 0.1)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_transformers_with_equal_logits(name, tmp_path):
    config, cls = FAMILIES[name]
    ours = with_random_biases(build_model(config))
    to_hf(ours).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(theirs) is cls
    diff = logit_difference(ours, theirs, config.vocab_size)
    print(f"export {name}: max abs logit difference {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_import_of_a_transformers_model_has_equal_logits(name, tmp_path):
    config, cls = FAMILIES[name]
    hf_config = to_hf(build_model(config)).config  # a transformers config of this family and shape
    theirs = cls(hf_config).float()
    torch.manual_seed(1)
    with torch.no_grad():  # every tensor random, norms around 1, so that each one's mapping is checked
        for param_name, param in theirs.named_parameters():
            is_norm = param.dim() == 1 and ("norm" in param_name or "ln" in param_name) and param_name.endswith("weight")
            param.copy_(1 + 0.1 * torch.randn_like(param) if is_norm else 0.02 * torch.randn_like(param))
        for layer in getattr(getattr(theirs, "model", None), "layers", []):
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(std=0.3)
                if hasattr(layer.mlp.gate, "e_score_correction_bias"):
                    layer.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    ours = from_hf(str(tmp_path))
    diff = logit_difference(ours, theirs, config.vocab_size)
    print(f"import {name}: max abs logit difference {diff:.2e}")
    assert diff <= 1e-5


REFUSED = [
    (make_config([dict(attn="mla", n_head=4, kv_latent_dim=16, rope_head_dim=8), dict(attn="gqa", n_head=4, n_kv_heads=2)],
                 pos_emb="rope"), "the layers mix attention kinds (gqa, mla)"),
    (make_config(dict(attn="mha", n_head=4), pos_emb="sin"), "sinusoidal positions"),
    (make_config(dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity="gelu"), pos_emb="rope", norm="rms"),
     "needs RMSNorm and SwiGLU"),
    (make_config(dict(attn="mha", n_head=4, non_linearity="mish"), pos_emb="learn"), "one of the activations"),
    (make_config(dict(MOE, router_score="softmax"), pos_emb="rope", norm="rms", norm_eps=1e-6), "sigmoid scores"),
    (make_config(MLA, pos_emb="rope", norm="rms"), "train with --norm_eps 1e-6"),
    (make_config([MOE, MLA], pos_emb="rope", norm="rms", norm_eps=1e-6), "dense layers first"),
    (make_config([dict(MIXTRAL_MOE, ffn="dense"), MIXTRAL_MOE], pos_emb="rope", norm="rms"),
     "only with MLA attention"),
    (make_config(dict(MIXTRAL_MOE, n_shared=1, n_act=3), pos_emb="rope", norm="rms"), "--n_shared 0"),
    (make_config(dict(MIXTRAL_MOE, router_score="softmax"), pos_emb="rope", norm="rms"), "--router_score mixtral"),
    (make_config(dict(MIXTRAL_MOE, jitter_noise=0.01), pos_emb="rope", norm="rms"), "train with --jitter_noise 0"),
    (make_config(dict(MIXTRAL_MOE, aux_free=True), pos_emb="rope", norm="rms"), "without --aux_free"),
    (make_config([dict(attn="mha", n_head=4, up_dim=32), dict(attn="mha", n_head=4, up_dim=64)]), "layers differ in up_dim"),
]


@pytest.mark.parametrize("config,message", REFUSED, ids=[m for _, m in REFUSED])
def test_unsupported_models_are_refused_with_the_blocking_feature(config, message):
    with pytest.raises(ConfigError, match=r"cannot export: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        to_hf(build_model(config))


def toy_attention(block: BlockConfig, config: LLMconfig) -> torch.nn.Module:
    """The toy mixer kind's module: GQA's, built as MHA."""
    return gqa.GroupedQueryAttention(replace(block, attn="mha"), config)


@pytest.fixture
def toy_mixer():
    """attn="toy": GQA's module and checks under a name that no family declares."""
    register_mixer(MixerKind("toy", toy_attention, gqa.validate))
    yield
    MIXERS.pop("toy")


def test_a_kind_no_family_declares_is_refused_by_name(toy_mixer):
    """Otherwise a Llama model (RoPE, RMSNorm, SwiGLU, an MHA module): the kind's name alone blocks export."""
    config = make_config(dict(attn="toy", n_head=4, non_linearity="swiglu", up_dim=64), pos_emb="rope", norm="rms")
    with pytest.raises(ConfigError, match=r"^cannot export: attn='toy' is a kind no transformers family represents; "
                                          r"use attn in gqa, mamba, mha, mla, mqa, or add a family for it in llm/hf/$"):
        to_hf(build_model(config))


def test_every_registered_family_has_a_model_here():
    assert {family(config) for config, _ in FAMILIES.values()} == set(REGISTERED)


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_map_covers_every_tensor_on_both_sides_exactly_once(name):
    config, _ = FAMILIES[name]
    ours = build_model(config)
    theirs = saved_tensors(transformers.AutoModelForCausalLM.from_config(hf_config(config)))
    pairs = weight_pairs(ours, REGISTERED[family(config)])
    assert sorted(p.theirs for p in pairs) == sorted(theirs)  # every transformers tensor, each once
    with torch.no_grad():  # every element of every one of our tensors in exactly one entry's view
        for tensor in saved_tensors(ours).values():
            tensor.zero_()
        for p in pairs:
            if p.tensor is not None:
                assert p.tensor.shape == theirs[p.theirs].shape, p.theirs
                p.tensor.add_(1)
    for tensor_name, tensor in saved_tensors(ours).items():
        padded = tensor_name in ("tok_emb.weight", "lm_head.weight")  # rows past vocab_size are ours alone
        assert bool((tensor[: config.vocab_size] if padded else tensor).eq(1).all()), tensor_name


def test_export_cli_writes_a_gpt2_tokenizer_and_init_from_reads_it_back(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Hello world. " * 400)
    from llm.data.prepare import PrepareArgs, prepare

    prepare(PrepareArgs("text", source=str(text), out=str(tmp_path / "data" / "gpt2text"), workers=1))
    flags = ["--data_dir", str(tmp_path / "data"), "--dataset", "gpt2text", "--out_dir", str(tmp_path), "--max_iters",
             "2", "--save_model", "--n_layer", "1", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
             "--total_batch_size_str", "64", "--non_linearity", "gelu_tanh", "--bias"]
    train(*parse(flags))
    out = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sample = "Hello world<|endoftext|> héllo  \n\n x's 123"
    assert tokenizer.encode(sample) == tiktoken.get_encoding("r50k_base").encode(sample, allowed_special="all")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 50256
    trained = read_weights(best_or_latest(tmp_path / "run"))
    imported = from_hf(str(out)).state_dict()
    assert all(torch.equal(imported[k][:50257], v[:50257]) for k, v in trained.items())  # padded vocab rows aside
    run_flags = ["--data_dir", str(tmp_path / "data"), "--dataset", "gpt2text", "--out_dir", str(tmp_path),
                 "--max_iters", "2", "--batch_size", "4", "--total_batch_size_str", "64"]  # the model comes with --init_from
    metrics = train(*parse(run_flags + ["--init_from", f"hf:{out}", "--wandb_run_name", "finetune"]))
    assert metrics["step"] == 1  # fine-tuning ran from the exported weights (architecture from the directory)
    with pytest.raises(ConfigError, match="no such directory; pass a transformers model directory on this machine"):
        train(*parse(run_flags + ["--init_from", f"hf:{tmp_path / 'missing'}", "--wandb_run_name", "missing"]))
    with pytest.raises(ConfigError, match=r"--n_embd is not honoured with --init_from hf:.*: the architecture comes"):
        parse(run_flags + ["--init_from", f"hf:{out}", "--n_embd", "64"])


@pytest.mark.parametrize("model_type", REGISTERED)
def test_every_transformers_config_field_is_mapped_refused_or_ignored(model_type):
    """A field that transformers adds to a family's config class fails here until the family declares it."""
    fam = REGISTERED[model_type]
    fields = {f.name for f in dataclasses.fields(getattr(transformers, fam.config_class))}
    groups = [MAPPED_EVERYWHERE, IGNORED_EVERYWHERE, fam.mapped, {r.field for r in fam.refusals}, fam.ignored]
    declared = [name for group in groups for name in group]
    assert len(declared) == len(set(declared)), "a field is declared twice"
    assert sorted(fields - set(declared)) == [], f"{fam.title}: fields neither mapped, refused nor ignored"
    assert sorted(set(declared) - fields) == [], f"{fam.title}: declared fields its config class does not have"


REFUSED_FIELDS = {  # (family, field) -> a value we do not represent; every declared Refusal has one
    ("gpt2", "scale_attn_weights"): False,
    ("gpt2", "scale_attn_by_inverse_layer_idx"): True,
    ("gpt2", "add_cross_attention"): True,
    ("llama", "hidden_act"): "gelu",
    ("deepseek_v3", "hidden_act"): "gelu",
    ("deepseek_v3", "attention_bias"): True,
    ("mistral", "hidden_act"): "gelu",
    ("mixtral", "hidden_act"): "gelu",
    ("mixtral", "router_jitter_noise"): 0.01,
    ("qwen2", "hidden_act"): "gelu",
    ("qwen3", "hidden_act"): "gelu",
    ("qwen3", "attention_bias"): True,
}


def test_every_refusal_has_a_case():
    assert {(t, r.field) for t, fam in REGISTERED.items() for r in fam.refusals} == set(REFUSED_FIELDS)


@pytest.mark.parametrize("model_type,field", REFUSED_FIELDS, ids=[f"{t}-{f}" for t, f in REFUSED_FIELDS])
def test_a_refused_field_value_is_a_one_line_import_error(model_type, field):
    config = next(c for c, _ in FAMILIES.values() if family(c) == model_type)
    hf = hf_config(config)
    setattr(hf, field, REFUSED_FIELDS[model_type, field])
    with pytest.raises(ConfigError, match=rf"^cannot import {REGISTERED[model_type].title} with {field}=.*: ") as e:
        config_from_hf(hf)
    assert "\n" not in str(e.value)


def scaled_llama(tmp_path):
    """A saved transformers Llama with llama3 RoPE scaling (the scaling matters at the check's 16 positions)."""
    config = make_config(dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity="swiglu", up_dim=64), pos_emb="rope",
                         norm="rms", rope_scaling="llama3", rope_factor=8.0, rope_original_max_position_embeddings=4)
    theirs = transformers.LlamaForCausalLM(hf_config(config)).float()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    return str(tmp_path)


def test_the_import_check_refuses_a_mapping_that_drops_a_field(tmp_path, monkeypatch):
    directory = scaled_llama(tmp_path)
    assert from_hf(directory).config.rope_scaling == "llama3"  # the right mapping passes the check
    mapped = common.our_rope_fields
    monkeypatch.setattr(common, "our_rope_fields", lambda hf_cfg: {**mapped(hf_cfg), "rope_scaling": "none"})
    with pytest.raises(ConfigError, match=r"^import check failed for .*: logits differ from transformers' by "
                                          r"\d\.\d\de[-+]\d\d \(> 1e-04, fp32\)") as e:
        from_hf(directory)
    assert "\n" not in str(e.value)
    assert from_hf(directory, check=False).config.rope_scaling == "none"  # what the check caught


def test_no_import_check_flag_reaches_the_import(tmp_path, monkeypatch, char_data):
    calls = []
    monkeypatch.setattr(hf_package, "check_import", lambda *args: calls.append(args))
    directory = scaled_llama(tmp_path / "hf")
    flags = ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "1", "--no_save_model",
             "--batch_size", "2", "--init_from", f"hf:{directory}"]
    train(*parse(flags + ["--no_import_check"]))
    assert calls == []
    train(*parse(flags + ["--wandb_run_name", "checked"]))
    assert len(calls) == 1
