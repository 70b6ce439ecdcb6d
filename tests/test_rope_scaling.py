"""RoPE scaling (linear, llama3, yarn): frequencies against direct implementations of their definitions, logit parity
with transformers beyond the original context (export and import), caches, causality, gradients and refusals."""
import copy
import json
import math

import pytest
import torch
import transformers

from llm.cli import parse
from llm.config import ConfigError
from llm.generate import generate
from llm.hf import config_from_hf, from_hf, hf_config, to_hf
from llm.model import LLM, build_model
from llm.model.positions import RopeScaling, rope_angles
from tests.conftest import make_config

ORIGINAL, LONG = 64, 200  # the original context and the positions tested beyond it
THETA, DIM = 5e5, 16
SCALINGS = {  # the Llama 3.1 example, and each other type with the parameters that change it
    "linear": dict(rope_scaling="linear", rope_factor=4.0),
    "llama3": dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_position_embeddings=ORIGINAL),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_position_embeddings=ORIGINAL),
    "yarn-mscale": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_position_embeddings=ORIGINAL,
                        rope_mscale=0.707, rope_mscale_all_dim=1.0, rope_beta_fast=16.0, rope_beta_slow=2.0),
    "yarn-attention-factor": dict(rope_scaling="yarn", rope_factor=4.0, rope_attention_factor=1.3,
                                  rope_original_max_position_embeddings=ORIGINAL),
}
LLAMA = dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity="swiglu", up_dim=64)
MLA = dict(attn="mla", n_head=4, q_latent_dim=24, kv_latent_dim=32, rope_head_dim=DIM, qk_nope_head_dim=16,
           v_head_dim=12, rope_interleave=True, non_linearity="swiglu", up_dim=64)
DEEPSEEK_YARN = {  # DeepSeek-V3's form (mscale = mscale_all_dim: cos/sin unscaled, the softmax scale grows), and both
    "deepseek-v3": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_position_embeddings=ORIGINAL,
                        rope_mscale=1.0, rope_mscale_all_dim=1.0),
    "mscales-differ": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_position_embeddings=ORIGINAL,
                           rope_mscale=0.707, rope_mscale_all_dim=1.0, rope_beta_fast=16.0),
}


def llama_config(scaling: dict, **fields):
    """A Llama-shaped model of head size 16 (context 256 unless given) with RoPE scaling `scaling`."""
    return make_config(LLAMA, **{**dict(n_embd=64, pos_emb="rope", norm="rms", rope_theta=THETA, block_size=256),
                                 **scaling, **fields})


def deepseek_config(scaling: dict, **fields):
    """A DeepSeek-V3-shaped MLA model (rope head 16, interleaved) with RoPE scaling `scaling`."""
    return make_config(MLA, **{**dict(n_embd=64, pos_emb="rope", norm="rms", norm_eps=1e-6, rope_theta=THETA,
                                      block_size=256, tie_embeddings=False), **scaling, **fields})


def reference_frequencies(s: dict, dim: int, theta: float) -> tuple[list[float], float]:
    """The rotation frequency of each pair of dimensions and the cos/sin factor, one dimension at a time in float64,
    as each method defines them."""
    base = [theta ** (-2 * i / dim) for i in range(dim // 2)]
    kind, factor = s["rope_scaling"], s["rope_factor"]
    original = s.get("rope_original_max_position_embeddings", ORIGINAL)
    if kind == "linear":  # Chen et al. 2023: position m becomes m / factor
        return [f / factor for f in base], 1.0
    if kind == "llama3":  # Llama 3.1: by wavelength against original / high and original / low
        low, high = s["rope_low_freq_factor"], s["rope_high_freq_factor"]
        out = []
        for f in base:
            wavelength = 2 * math.pi / f
            if wavelength < original / high:
                out.append(f)
            elif wavelength > original / low:
                out.append(f / factor)
            else:
                smooth = (original / wavelength - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out, 1.0
    # YaRN (Peng et al. 2023, its reference code): the dimension at which a frequency makes b turns over the
    # original context, rounded outwards, bounds a linear ramp from kept (extrapolated) to divided by factor
    fast, slow = s.get("rope_beta_fast", 32.0), s.get("rope_beta_slow", 1.0)

    def dimension(turns: float) -> float:
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dimension(fast)), 0), min(math.ceil(dimension(slow)), dim - 1)
    out = []
    for i, f in enumerate(base):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(ramp * f / factor + (1 - ramp) * f)
    if s.get("rope_attention_factor") is not None:
        return out, s["rope_attention_factor"]

    def mscale(m: float) -> float:
        return 0.1 * m * math.log(factor) + 1.0

    if s.get("rope_mscale") and s.get("rope_mscale_all_dim"):
        return out, mscale(s["rope_mscale"]) / mscale(s["rope_mscale_all_dim"])
    return out, mscale(1.0)


@pytest.mark.parametrize("name", SCALINGS)
def test_angles_match_a_direct_implementation_of_each_definition(name):
    s = SCALINGS[name]
    config = llama_config(s)
    positions = torch.arange(LONG)[None]  # (1, T)
    cos, sin = rope_angles(positions, DIM, THETA, RopeScaling.of(config))  # (1, T, 1, DIM) each
    freqs, attention_factor = reference_frequencies(s, DIM, THETA)
    for i, f in enumerate(freqs):
        for m in (0, 1, ORIGINAL - 1, 130, LONG - 1):
            for column in (i, i + DIM // 2):  # dimension i and its rotation partner share the angle
                assert cos[0, m, 0, column].item() == pytest.approx(attention_factor * math.cos(m * f), abs=2e-5)
                assert sin[0, m, 0, column].item() == pytest.approx(attention_factor * math.sin(m * f), abs=2e-5)


@pytest.mark.parametrize("name", SCALINGS)
def test_scaling_changes_frequencies_that_rotate_slowly_over_the_original_context(name):
    """Each case scales some frequencies: its angles differ from unscaled RoPE's (otherwise parity proves little)."""
    positions = torch.arange(LONG)[None]
    scaled, _ = rope_angles(positions, DIM, THETA, RopeScaling.of(llama_config(SCALINGS[name])))
    plain, _ = rope_angles(positions, DIM, THETA)
    assert (scaled - plain).abs().max().item() > 0.1


def logit_difference(ours: LLM, theirs: torch.nn.Module, tokens: int = LONG) -> float:
    idx = torch.randint(0, ours.config.vocab_size, (2, tokens))
    with torch.no_grad():
        return (ours.eval()(idx).logits - theirs.eval()(input_ids=idx).logits).abs().max().item()


@pytest.mark.parametrize("name", SCALINGS)
def test_export_has_the_logits_of_transformers_beyond_the_original_context(name, tmp_path):
    ours = build_model(llama_config(SCALINGS[name]))
    to_hf(ours).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    diff = logit_difference(ours, theirs)
    print(f"export rope {name}: max abs logit difference {diff:.2e} at {LONG} tokens")
    assert diff <= 1e-5
    unscaled = transformers.AutoModelForCausalLM.from_config(hf_config(llama_config({}))).float()
    unscaled.load_state_dict(theirs.state_dict())
    assert logit_difference(ours, unscaled) > 1e-4  # the scaling matters at these positions


@pytest.mark.parametrize("name", SCALINGS)
def test_import_of_a_scaled_transformers_llama_has_its_logits(name, tmp_path):
    theirs = transformers.LlamaForCausalLM(hf_config(llama_config(SCALINGS[name]))).float()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(std=0.05)
    theirs.save_pretrained(tmp_path)
    ours = from_hf(str(tmp_path))
    for field, value in SCALINGS[name].items():
        assert getattr(ours.config, field) == value, field
    diff = logit_difference(ours, theirs)
    print(f"import rope {name}: max abs logit difference {diff:.2e} at {LONG} tokens")
    assert diff <= 1e-5


@pytest.mark.parametrize("name", DEEPSEEK_YARN)
def test_mla_under_yarn_has_the_logits_of_transformers_deepseek_v3_both_ways(name, tmp_path):
    """Export and import at 200 tokens (original context 64); DeepSeek's mscale^2 on the softmax scale and the
    scaled frequencies each matter."""
    ours = build_model(deepseek_config(DEEPSEEK_YARN[name]))
    to_hf(ours).save_pretrained(tmp_path / "export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    assert isinstance(theirs, transformers.DeepseekV3ForCausalLM)
    diff = logit_difference(ours, theirs)
    print(f"export MLA rope {name}: max abs logit difference {diff:.2e} at {LONG} tokens")
    assert diff <= 1e-5
    for attribute, unscaled in (("scale", 1 / math.sqrt(16 + DIM)), ("rope_scaling", None)):
        changed = copy.deepcopy(ours)
        for block in changed.blocks:
            setattr(block.attn, attribute, unscaled)
        assert logit_difference(changed, theirs) > 1e-4  # the softmax mscale and the frequencies each matter
    theirs = transformers.DeepseekV3ForCausalLM(hf_config(deepseek_config(DEEPSEEK_YARN[name]))).float()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(std=0.05)
    theirs.save_pretrained(tmp_path / "import")
    ours = from_hf(str(tmp_path / "import"))
    for field, value in DEEPSEEK_YARN[name].items():
        assert getattr(ours.config, field) == value, field
    diff = logit_difference(ours, theirs)
    print(f"import MLA rope {name}: max abs logit difference {diff:.2e} at {LONG} tokens")
    assert diff <= 1e-5


def test_a_legacy_rope_scaling_entry_is_imported(tmp_path):
    """config.json files written before transformers 5 carry rope_theta and rope_scaling {"type": ...}."""
    theirs = transformers.LlamaForCausalLM(hf_config(llama_config({}))).float()
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("rope_parameters")
    saved.update(rope_theta=THETA, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = config_from_hf(transformers.AutoConfig.from_pretrained(tmp_path))
    assert (config.rope_theta, config.rope_scaling, config.rope_factor) == (THETA, "linear", 2.0)


REFUSED_IMPORTS = [
    (dict(rope_type="dynamic", factor=2.0), "cannot import rope_type='dynamic'"),
    (dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=64),
     "cannot import rope_type='longrope'"),
    (dict(rope_type="default", partial_rotary_factor=0.5), "cannot import partial_rotary_factor"),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, truncate=False), "truncate=false"),
]


@pytest.mark.parametrize("params,message", REFUSED_IMPORTS, ids=[m for _, m in REFUSED_IMPORTS])
def test_rope_types_and_keys_we_do_not_represent_are_refused_on_import(params, message):
    hf = hf_config(llama_config({}))
    hf.rope_parameters = dict(params, rope_theta=THETA)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_hf(hf)


@pytest.mark.parametrize("name", ["llama3", "yarn-mscale", "mla-mscales-differ"])
def test_cache_equals_recomputation_beyond_the_original_context(name):
    """GQA's KV cache, and MLA's absorbed latent cache with its softmax mscale."""
    if name.startswith("mla-"):
        model = build_model(deepseek_config(DEEPSEEK_YARN[name[4:]], block_size=96)).eval()
    else:
        model = build_model(llama_config(SCALINGS[name], block_size=96)).eval()
    prompt = [list(range(1, 60))]
    logits = {}
    for use_cache in (True, False):
        steps = []
        generate(model, prompt, 50, temperature=0, use_cache=use_cache,
                 on_step=lambda step_logits, new: steps.append(step_logits.clone()))
        logits[use_cache] = torch.stack(steps)  # (steps, 1, V)
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attn", [LLAMA, dict(attn="nsa", n_head=4, n_kv_heads=2, sliding_window_size=8), MLA],
                         ids=["gqa", "nsa", "mla"])
@pytest.mark.parametrize("name", ["llama3", "yarn"])
def test_scaled_attention_is_causal_and_every_parameter_learns(attn, name):
    model = build_model(make_config(attn, n_embd=64, pos_emb="rope", norm="rms", block_size=96, **SCALINGS[name]))
    idx = torch.randint(0, model.config.vocab_size, (2, 90))
    model.train()
    model(idx, idx).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    changed = idx.clone()
    changed[:, 70] = (changed[:, 70] + 1) % model.config.vocab_size
    with torch.no_grad():
        before, after = model(idx).logits, model(changed).logits
    assert torch.equal(before[:, :70], after[:, :70])
    assert not torch.equal(before[:, 70:], after[:, 70:])


def test_parameter_count_does_not_depend_on_rope_scaling():
    count = lambda config: sum(p.numel() for p in build_model(config).parameters())  # noqa: E731
    assert count(llama_config(SCALINGS["yarn"])) == count(llama_config({}))


BAD_FLAGS = [
    (["--rope_scaling", "llama3"], "rope_scaling=llama3 needs pos_emb=rope"),
    (["--pos_emb", "rope", "--rope_scaling", "llama3", "--rope_low_freq_factor", "4", "--rope_high_freq_factor", "1"],
     "must satisfy 0 < low < high"),
    (["--pos_emb", "rope", "--rope_scaling", "yarn", "--rope_beta_fast", "1", "--rope_beta_slow", "32"],
     "must satisfy 0 < beta_slow < beta_fast"),
    (["--pos_emb", "rope", "--rope_scaling", "linear", "--rope_factor", "0"], "rope_factor=0.0 must be > 0"),
    (["--pos_emb", "rope", "--rope_scaling", "yarn", "--rope_original_max_position_embeddings", "0"],
     "rope_original_max_position_embeddings=0 must be >= 1"),
    (["--pos_emb", "rope", "--rope_scaling", "yarn", "--rope_attention_factor", "-1"],
     "rope_attention_factor=-1.0 must be > 0"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[m for _, m in BAD_FLAGS])
def test_bad_rope_scaling_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        parse(flags)
    assert "\n" not in str(error.value)


def test_flags_set_the_scaling_and_unset_original_means_block_size():
    model, _ = parse(["--pos_emb", "rope", "--rope_scaling", "yarn", "--rope_factor", "2"])
    scaling = RopeScaling.of(model)
    assert (scaling.kind, scaling.factor, scaling.original) == ("yarn", 2.0, model.block_size)
    assert scaling.attention_factor == pytest.approx(0.1 * math.log(2.0) + 1.0)
