"""The attention kernels: the choice of kernel over a table of calls and machines, its one-line refusals (at config
time where the config tells), and on CPU the flash path's layout logic, FlexAttention and SDPA's cuDNN paths."""
import dataclasses
import math
import re
import warnings

import pytest
import torch

from llm.cli import parse
from llm.config import ConfigError
from llm.generate import generate
from llm.model import LLM, build_model
from llm.model.mixers import attention as kernels
from llm.model.mixers.attention import AttentionCall, Machine, select_backend
from tests.conftest import make_config

BF16, FP32 = torch.bfloat16, torch.float32
NEW_CUDNN, OLD_CUDNN = 91501, 90100
H100_FA4 = Machine(frozenset({4}), (9, 0), NEW_CUDNN)
H100_FA2 = Machine(frozenset({2}), (9, 0), NEW_CUDNN)
H100_FA2_OLD_CUDNN = Machine(frozenset({2}), (9, 0), OLD_CUDNN)
H100_BOTH = Machine(frozenset({2, 4}), (9, 0), NEW_CUDNN)
H100_BARE = Machine(frozenset(), (9, 0), NEW_CUDNN)
A100_FA2 = Machine(frozenset({2}), (8, 0), NEW_CUDNN)
A100_FA4 = Machine(frozenset({4}), (8, 0), NEW_CUDNN)
V100 = Machine(frozenset({2}), (7, 0), NEW_CUDNN)
CPU = Machine()
CPU_FA4 = Machine(frozenset({4}))


def call(device="cuda", dtype=BF16, qk=64, v=64, masked=False, dropout_p=0.0, needs_grad=True) -> AttentionCall:
    return AttentionCall(device, dtype, qk, v, masked, dropout_p, needs_grad)


GQA = call()
MLA = call(qk=64 + 16)  # query/key heads carry the rope part: head size + rope_head_dim
MLA_WIDE = call(qk=192, v=128)  # DeepSeek-V3's sizes: beyond what cuDNN takes here

CHOICES = [
    ("auto", call("cpu", FP32), CPU, "sdpa"),
    ("auto", call("cpu", BF16), CPU_FA4, "sdpa"),
    ("auto", GQA, H100_FA4, "flash4"),
    ("auto", GQA, H100_BOTH, "flash4"),
    ("auto", MLA, H100_FA4, "cudnn"),  # unequal head sizes: not flash-attn
    ("auto", MLA_WIDE, H100_FA4, "sdpa"),
    ("auto", call(dtype=FP32), H100_FA4, "sdpa"),
    ("auto", call(masked=True), H100_FA4, "cudnn"),  # a padded batch in generation
    ("auto", call(masked=True), A100_FA2, "sdpa"),
    ("auto", call(dropout_p=0.125), H100_FA4, "cudnn"),  # flash-attn-4 has no dropout
    ("auto", call(dropout_p=0.1), H100_BOTH, "flash2"),
    ("auto", call(dropout_p=0.1), H100_FA4, "sdpa"),  # cuDNN's dropout comes in 1/16 steps
    ("auto", GQA, H100_FA2, "cudnn"),  # on Hopper cuDNN beats flash-attn 2
    ("auto", GQA, H100_FA2_OLD_CUDNN, "flash2"),
    ("auto", GQA, H100_BARE, "cudnn"),
    ("auto", GQA, A100_FA2, "flash2"),
    ("auto", GQA, A100_FA4, "sdpa"),  # flash-attn-4 needs Hopper, cuDNN is not preferred before it
    ("auto", call(qk=256, v=256), H100_FA4, "flash4"),
    ("auto", call(qk=256, v=256), H100_BARE, "sdpa"),
    ("auto", call(qk=12, v=12), H100_BARE, "sdpa"),
    ("sdpa", GQA, H100_FA4, "sdpa"),
    ("sdpa", call("cpu", FP32), CPU, "sdpa"),
    ("flash", GQA, H100_FA4, "flash4"),
    ("flash", GQA, H100_FA2, "flash2"),
    ("flash", call(dropout_p=0.1), H100_BOTH, "flash2"),
    ("cudnn", GQA, H100_BARE, "cudnn"),
    ("cudnn", MLA, A100_FA2, "cudnn"),
    ("cudnn", call(masked=True), H100_BARE, "cudnn"),
    ("flex", GQA, H100_BARE, "flex"),
    ("flex", MLA, H100_BARE, "flex"),
    ("flex", call(masked=True), H100_BARE, "flex"),
    ("flex", call("cpu", FP32, needs_grad=False), CPU, "flex"),
    ("flex", call("cpu", FP32, masked=True, needs_grad=False), CPU, "flex"),
]

REFUSALS = [
    ("flash", call("cpu", FP32), CPU, "flash-attn is not installed (pip install 'llm[flash]')"),
    ("flash", call("cpu", BF16), CPU_FA4, "it runs on CUDA GPUs only"),
    ("flash", GQA, H100_BARE, "flash-attn is not installed"),
    ("flash", GQA, A100_FA4, "flash-attn-4 needs compute capability 9.0 or newer"),
    ("flash", GQA, V100, "flash-attn 2 needs compute capability 8.0 or newer"),
    ("flash", call(dtype=FP32), H100_FA4, "it needs fp16 or bf16 inputs, got torch.float32"),
    ("flash", MLA, H100_BOTH, "it needs equal query/key and value head sizes, got 80 and 64 (MLA with RoPE)"),
    ("flash", call(qk=300, v=300), H100_FA4, "a multiple of 8 up to 256, got 300"),
    ("flash", call(masked=True), H100_BOTH, "it takes no padding mask"),
    ("flash", call(dropout_p=0.1), H100_FA4, "flash-attn-4 has no attention dropout (set --dropout 0)"),
    ("cudnn", call("cpu", FP32), CPU, "it runs on CUDA GPUs only"),
    ("cudnn", GQA, V100, "it needs compute capability 8.0 or newer"),
    ("cudnn", GQA, Machine(frozenset(), (9, 0), 0), "this PyTorch has no cuDNN"),
    ("cudnn", call(dtype=FP32), H100_BARE, "it needs fp16 or bf16 inputs"),
    ("cudnn", MLA_WIDE, H100_BARE, "multiples of 8 up to 128, got 192 and 128"),
    ("cudnn", call(dropout_p=0.1), H100_BARE, "its dropout must be a multiple of 1/16, got 0.1"),
    ("flex", call(dropout_p=0.1), H100_BARE, "FlexAttention has no attention dropout"),
    ("flex", call("cpu", FP32), CPU, "FlexAttention has no backward pass on CPU"),
    ("flex", call("mps", FP32), CPU, "it runs on CUDA and CPU, not mps"),
]


@pytest.mark.parametrize("requested,attention,machine,expected", CHOICES)
def test_backend_choice(requested, attention, machine, expected):
    assert select_backend(requested, attention, machine) == expected


@pytest.mark.parametrize("requested,attention,machine,reason", REFUSALS)
def test_impossible_backend_is_a_one_line_error(requested, attention, machine, reason):
    with pytest.raises(ConfigError) as error:
        select_backend(requested, attention, machine)
    message = str(error.value)
    assert message.startswith(f"attn_backend={requested} cannot run here: ")
    assert reason in message and message.endswith("; use --attn_backend auto") and "\n" not in message


def test_forced_flash_on_cpu_tensors_is_a_clear_error():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ConfigError, match="attn_backend=flash cannot run here: "):
        kernels.causal_attention(q, q, q, "flash", 0.0)


@pytest.mark.parametrize("argv,needle", [
    (["--attn_backend", "cudnn", "--device", "cpu"], "attn_backend=cudnn cannot train on device=cpu (it needs a CUDA"),
    (["--attn_backend", "flex", "--device", "cpu"], "FlexAttention has no backward on CPU"),
    (["--attn_backend", "flex", "--dropout", "0.1"], "attn_backend=flex has no attention dropout but dropout=0.1"),
])
def test_config_time_refusals(argv, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse(argv)


def test_flash_on_cpu_is_refused_at_config_time(monkeypatch):
    monkeypatch.setattr(kernels, "FLASH", {4: None})  # as if flash-attn-4 were installed
    with pytest.raises(ConfigError, match="attn_backend=flash cannot train on device=cpu"):
        parse(["--attn_backend", "flash", "--device", "cpu"])
    parse(["--attn_backend", "flash", "--device", "cuda"])


def reference_flash_attn(q, k, v, dropout_p, scale, causal):
    """The flash kernels' contract on (B, T, H, D) queries over (B, S, KV, D) keys with KV dividing H, by explicit
    scores; the causal mask is aligned to the bottom right when S > T (no mask when not causal)."""
    assert dropout_p == 0.0
    B, T, H, D = q.shape
    S = k.size(1)
    k = k.repeat_interleave(H // k.size(2), dim=2)  # (B, S, H, D)
    v = v.repeat_interleave(H // v.size(2), dim=2)  # (B, S, H, Dv)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * (scale or 1 / math.sqrt(D))  # (B, H, T, S)
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T) if causal else torch.ones(T, S, dtype=torch.bool)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", weights, v)  # (B, T, H, Dv)


SPECS = [dict(attn="mha", n_head=4), dict(attn="gqa", n_head=4, n_kv_heads=2), dict(attn="mqa", n_head=4),
         dict(attn="mla", n_head=4, kv_latent_dim=16)]


def models(spec: dict, **fields) -> tuple[LLM, LLM]:
    """The same weights with attn_backend sdpa and with the given fields."""
    rope = spec["attn"] != "mla" or "rope_head_dim" in spec
    config = make_config(spec, pos_emb="rope" if rope else "learn", **fields)
    model = build_model(config).eval()
    reference = build_model(dataclasses.replace(config, attn_backend="sdpa")).eval()
    reference.load_state_dict(model.state_dict())
    return reference, model


@pytest.mark.parametrize("version", [4, 2])
@pytest.mark.parametrize("spec", SPECS)
def test_flash_path_equals_sdpa_path(spec, version, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "FLASH", {version: lambda *a: calls.append(1) or reference_flash_attn(*a)})
    reference, model = models(spec)
    monkeypatch.setattr(kernels, "select_backend",
                        lambda requested, call, machine: f"flash{version}" if requested == "auto" else "sdpa")
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, reference(idx).logits, rtol=1e-5, atol=1e-5)
    assert len(calls) == model.config.n_layer


def test_sdpa_backend_never_uses_flash(monkeypatch):
    monkeypatch.setattr(kernels, "FLASH", {4: lambda *a: pytest.fail("flash used with backend sdpa")})
    monkeypatch.setattr(kernels, "machine_of", lambda device: H100_FA4)
    model = build_model(make_config(dict(attn="gqa", n_head=4, n_kv_heads=2), attn_backend="sdpa"))
    model(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("T,S,masked,dv", [(16, 16, False, 16), (16, 16, False, 8), (5, 21, False, 16),
                                           (1, 21, False, 8), (16, 21, True, 16)])
def test_flex_equals_sdpa_on_cpu(T, S, masked, dv, eager_flex):
    """Causal, with earlier keys from a cache (S > T), and with a padding mask; value heads narrower as in MLA."""
    q, k, v = torch.randn(2, T, 4, 16), torch.randn(2, S, 2, 16), torch.randn(2, S, 2, dv)
    mask = None
    if masked:
        mask = torch.ones(2, 1, T, S, dtype=torch.bool).tril(diagonal=S - T)
        mask[0, :, :, :3] = False  # row 0 left-padded by 3
    expected = kernels.causal_attention(q, k, v, "sdpa", 0.0, mask)
    torch.testing.assert_close(kernels.causal_attention(q, k, v, "flex", 0.0, mask), expected)


def test_compiled_flex_equals_sdpa_on_cpu():
    q, k, v = torch.randn(2, 16, 4, 16), torch.randn(2, 16, 2, 16), torch.randn(2, 16, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernels.causal_attention(q, k, v, "flex", 0.0),
                                   kernels.causal_attention(q, k, v, "sdpa", 0.0))


@pytest.mark.parametrize("spec", SPECS + [dict(attn="mla", n_head=4, kv_latent_dim=16, rope_head_dim=8)])
def test_flex_model_and_generation_equal_sdpa(spec, eager_flex):
    reference, model = models(spec, attn_backend="flex")
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, reference(idx).logits)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]  # a left-padded batch: the padding mask path
    assert generate(model, prompts, 6, temperature=0) == generate(reference, prompts, 6, temperature=0)


def test_flex_refuses_training_on_cpu():
    model = build_model(make_config(dict(attn="gqa", n_head=4, n_kv_heads=2), attn_backend="flex"))
    with pytest.raises(ConfigError, match="FlexAttention has no backward pass on CPU"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_cudnn_paths_on_cpu(monkeypatch):
    """Chosen by auto, cuDNN goes first and PyTorch's other kernels follow (here: math on CPU); requested, it is
    cuDNN only, and PyTorch's refusal becomes one line."""
    monkeypatch.setattr(kernels, "select_backend", lambda requested, call, machine: "cudnn")
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    torch.testing.assert_close(kernels.causal_attention(q, k, v, "auto", 0.0),
                               torch.nn.functional.scaled_dot_product_attention(
                                   q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                   enable_gqa=True).transpose(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="attn_backend=cudnn cannot run here: PyTorch's cuDNN attention refused"):
            kernels.causal_attention(q, k, v, "cudnn", 0.0)


def test_flex_inside_torch_compile_on_cpu():
    """Inside an outer torch.compile FlexAttention is compiled with the code around it (here RoPE, whose fused
    inputs torch 2.13's CPU kernel misreads unless they are made contiguous)."""
    from llm.model.positions import apply_rope, rope_angles

    def attend(x, backend):
        q, k, v = x.split([64, 32, 32], dim=-1)  # 4 query heads, 2 key/value heads of 16
        cos, sin = rope_angles(torch.arange(x.size(1))[None], 16, 10000.0)
        q, k = apply_rope(q.view(2, 16, 4, 16), cos, sin), apply_rope(k.view(2, 16, 2, 16), cos, sin)
        return kernels.causal_attention(q, k, v.view(2, 16, 2, 16), backend, 0.0)

    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(attend, fullgraph=True)(x, "flex"), attend(x, "sdpa"))
