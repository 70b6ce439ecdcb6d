"""Sliding-window attention (`window`): the kernels and every attention kind against attention computed from its
definition, causality and locality, the ring-buffer generation cache (past the window and past block_size), the
training schedule (its values, compiled without recompiling, resumed exactly) and the config's refusals."""
import dataclasses
import json
import math
import re
from fractions import Fraction

import pytest
import torch
from torch._dynamo.utils import counters

from llm.cli import parse
from llm.config import ConfigError, Trainconfig
from llm.generate import generate
from llm.hf import family
from llm.model import LLM, build_model
from llm.model.cache import WindowCache
from llm.model.mixers import attention as kernels
from llm.model.mixers.attention import AttentionCall, Machine, SlidingWindow, schedule_windows, select_backend
from llm.model.positions import apply_rope, rope_angles
from llm.precision import Precision
from llm.train import loop, train
from llm.train.distributed import Distributed
from llm.train.optim import build_optimizer
from llm.train.step import train_step
from llm.train.window_schedule import scheduled_window
from tests.conftest import make_config

CPU = torch.device("cpu")
SPECS = {
    "mha": dict(attn="mha", n_head=4),
    "mqa": dict(attn="mqa", n_head=4),
    "gqa": dict(attn="gqa", n_head=4, n_kv_heads=2),
    "mla": dict(attn="mla", n_head=4, q_latent_dim=24, kv_latent_dim=16, rope_head_dim=8),
}


def reference_attention(q, k, v, window, causal=True, scale=None):
    """Softmax attention by its definition, one query at a time: queries (B, T, H, D) are the last T of the S
    positions of keys (B, S, KV, D) and values (B, S, KV, Dv); query t (at position p = S - T + t) sees key s when
    0 <= p - s < window, or |p - s| < window when not causal (window None: unbounded)."""
    B, T, H, D = q.shape
    S = k.size(1)
    k = k.repeat_interleave(H // k.size(2), dim=2)  # (B, S, H, D)
    v = v.repeat_interleave(H // v.size(2), dim=2)  # (B, S, H, Dv)
    window = math.inf if window is None else int(window)
    out = torch.empty(B, T, H, v.size(-1))
    for t in range(T):
        p = S - T + t
        seen = [s for s in range(S) if (0 <= p - s < window if causal else abs(p - s) < window)]
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, seen]) * (scale or 1 / math.sqrt(D))  # (B, H, n)
        out[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(dim=-1), v[:, seen])
    return out  # (B, T, H, Dv)


def reference_mixer(attn, x, window, causal=True):
    """The attention layer's output (B, T, C) for x (B, T, C) at positions 0..T-1, from its weights and
    reference_attention: GQA's fused projection, or MLA's latent keys and values with the shared rope key."""
    B, T, _ = x.shape
    positions = torch.arange(T)[None]
    if hasattr(attn, "c_attn"):
        H, KV, hs = attn.n_head, attn.n_kv, attn.head_size
        q, k, v = attn.c_attn(x).split([H * hs, KV * hs, KV * hs], dim=-1)
        q, k, v = q.view(B, T, H, hs), k.view(B, T, KV, hs), v.view(B, T, KV, hs)
        cos, sin = rope_angles(positions, hs, attn.rope_theta)
        y = reference_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, window, causal)
        return attn.c_proj(y.reshape(B, T, H * hs))
    H, dn, dv, dr = attn.n_head, attn.nope_dim, attn.v_dim, attn.rope_dim
    q_nope, q_rope = attn.q_proj(x).view(B, T, H, dn + dr).split([dn, dr], dim=-1)
    latent, k_rope = attn.kv_down(x).split([attn.kv_latent_dim, dr], dim=-1)
    k_nope, v = attn.kv_up(attn.kv_norm(latent)).view(B, T, H, dn + dv).split([dn, dv], dim=-1)
    cos, sin = rope_angles(positions, dr, attn.rope_theta)
    q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)
    k = torch.cat((k_nope, apply_rope(k_rope.view(B, T, 1, dr), cos, sin).expand(B, T, H, dr)), dim=-1)
    return attn.c_proj(reference_attention(q, k, v, window, causal).reshape(B, T, H * dv))


def windowed(spec: dict, window: int | None, **fields) -> LLM:
    """A two-layer RoPE model of `spec` with every layer's window set (block_size 16 unless given)."""
    fields = {"pos_emb": "rope", "block_size": 16, **fields}
    return build_model(make_config({**spec, "window": window}, **fields))


# --- the kernel -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("causal,T,S", [(True, 12, 12), (True, 5, 12), (True, 1, 9), (False, 12, 12)])
@pytest.mark.parametrize("window", [1, 3, 12, 30, "tensor"])
def test_kernel_equals_the_definition(backend, causal, T, S, window, eager_flex):
    """Causal, with earlier keys from a cache (S > T), and bidirectional (a symmetric window); a window of at least
    S is full attention; a tensor window is a schedule's."""
    window = torch.tensor(4) if window == "tensor" else window
    q, k, v = torch.randn(2, T, 4, 8), torch.randn(2, S, 2, 8), torch.randn(2, S, 2, 6)
    with torch.no_grad():  # FlexAttention runs on CPU without gradients
        got = kernels.causal_attention(q, k, v, backend, 0.0, causal=causal, window=window)
    torch.testing.assert_close(got, reference_attention(q, k, v, window, causal), rtol=0, atol=1e-5)


def test_kernel_with_a_padding_mask_and_a_window(eager_flex):
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False  # row 1 left-padded by 3
    mask[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # a padding query sees itself
    expected = kernels.causal_attention(q, k, v, "sdpa", 0.0, mask & kernels.window_band(10, 10, 4, True, CPU))
    band = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-4)
    torch.testing.assert_close(kernels.window_band(10, 10, 4, True, CPU), band)
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            torch.testing.assert_close(kernels.causal_attention(q, k, v, backend, 0.0, mask, window=4), expected)


def call(device="cuda", dtype=torch.bfloat16, dropout_p=0.0, window="fixed") -> AttentionCall:
    return AttentionCall(device, dtype, 64, 64, False, dropout_p, True, window)


H100_FA2, H100_FA4 = Machine(frozenset({2}), (9, 0), 91501), Machine(frozenset({4}), (9, 0), 91501)
H100_BOTH = Machine(frozenset({2, 4}), (9, 0), 91501)


@pytest.mark.parametrize("requested,attention,machine,expected", [
    ("auto", call(), H100_FA2, "flash2"),  # flash-attn 2 takes window_size
    ("auto", call(), H100_BOTH, "flash2"),
    ("auto", call(), H100_FA4, "flex"),  # flash-attn-4 takes no window here
    ("auto", call(window="scheduled"), H100_BOTH, "flex"),  # a tensor window: mask-based kernels only
    ("auto", call(dtype=torch.float32), H100_FA2, "flex"),
    ("auto", call(dropout_p=0.1), H100_FA4, "sdpa"),  # FlexAttention has no dropout
    ("auto", call("cpu", torch.float32), Machine(), "sdpa"),
    ("auto", call("cpu", torch.float32, window="scheduled"), Machine(), "sdpa"),
    ("flash", call(), H100_BOTH, "flash2"),
    ("flex", call(window="scheduled"), H100_FA4, "flex"),
    ("sdpa", call(), H100_BOTH, "sdpa"),
])
def test_backend_choice_with_a_window(requested, attention, machine, expected):
    assert select_backend(requested, attention, machine) == expected


@pytest.mark.parametrize("attention,machine,reason", [
    (call(), H100_FA4, "flash-attn-4 runs no sliding window here (--window)"),
    (call(window="scheduled"), H100_FA2, "a scheduled window (--window_schedule) is a tensor"),
])
def test_flash_refuses_windows_it_cannot_take(attention, machine, reason):
    with pytest.raises(ConfigError, match=f"attn_backend=flash cannot run here: {re.escape(reason)}"):
        select_backend("flash", attention, machine)


def test_flash2_path_passes_the_window(monkeypatch):
    """flash-attn 2 gets the window (its window_size is (window - 1, 0)); here a stand-in that computes the
    definition, so the model's logits equal the SDPA path's."""
    calls = []

    def flash2(q, k, v, dropout_p, scale, causal, window=None):
        calls.append(window)
        return reference_attention(q, k, v, window, causal, scale)

    model = windowed(SPECS["gqa"], 5).eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        expected = model(idx).logits
        monkeypatch.setattr(kernels, "FLASH", {2: flash2})
        monkeypatch.setattr(kernels, "select_backend", lambda requested, call, machine: "flash2")
        torch.testing.assert_close(model(idx).logits, expected, rtol=1e-5, atol=1e-5)
    assert calls == [5, 5]


# --- the layers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_attention_kind_equals_the_definition(spec, backend, eager_flex):
    model = windowed(spec, 5, attn_backend=backend).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, model.config.n_embd)
    with torch.no_grad():
        got = attn(x, torch.arange(16)[None])
        torch.testing.assert_close(got, reference_mixer(attn, x, 5), rtol=0, atol=1e-5)
        attn.causal = False  # a bidirectional objective: the window is symmetric
        torch.testing.assert_close(attn(x, torch.arange(16)[None]), reference_mixer(attn, x, 5, causal=False),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_a_window_of_at_least_the_sequence_is_full_attention(spec):
    full = windowed(spec, None).eval()
    idx = torch.randint(0, 97, (2, 16))
    for window in (16, 100):
        model = windowed(spec, window).eval()
        model.load_state_dict(full.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(idx).logits, full(idx).logits, rtol=0, atol=1e-6)
    narrow = windowed(spec, 4).eval()
    narrow.load_state_dict(full.state_dict())
    with torch.no_grad():
        assert (narrow(idx).logits - full(idx).logits).abs().max() > 1e-3  # a narrower window changes them


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_causal_and_local(spec):
    """Changing token s never changes the logits before s, nor those that no path of n_layer windows reaches
    (from s + n_layer * (window - 1) + 1 on); it changes some in between."""
    model = windowed(spec, 3, block_size=32).eval()
    idx = torch.randint(0, 97, (2, 32))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 97
    with torch.no_grad():
        diff = (model(changed).logits - model(idx).logits).abs().amax(dim=(0, 2))  # (T,)
    reach = 10 + model.config.n_layer * 2  # the last position token 10 reaches through two layers of window 3
    assert diff[:10].max() == 0 and diff[reach + 1:].max() == 0 and diff[10:reach + 1].min() > 0


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_gradients_reach_every_parameter_and_the_window_adds_none(spec):
    model = windowed(spec, 4)
    schedule_windows(model, 2)  # the schedule's tensor path
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, idx)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    full = windowed(spec, None)
    assert model.get_num_params() == full.get_num_params()
    assert model.state_dict().keys() == full.state_dict().keys()  # the scheduled limit is not saved


def test_scheduled_limit_equals_that_window():
    """A schedule's limit below the layer's window computes the window of that size; above it, the layer's own."""
    model = windowed(SPECS["gqa"], 6).eval()
    idx = torch.randint(0, 97, (2, 16))
    for limit, window in ((2, 2), (5, 5), (100, 6)):
        reference = windowed(SPECS["gqa"], window).eval()
        reference.load_state_dict(model.state_dict())
        schedule_windows(model, limit)
        assert isinstance(model.blocks[0].attn.window.current(), torch.Tensor)
        with torch.no_grad():
            torch.testing.assert_close(model(idx).logits, reference(idx).logits, rtol=0, atol=1e-6)
    assert [m.limit.item() for m in model.modules() if isinstance(m, SlidingWindow)] == [6, 6]


# --- generation ----------------------------------------------------------------------------------------------------


def assert_generation_equals_recomputation(model: LLM, prompts: list[list[int]], steps: int) -> None:
    """Greedy tokens and each step's logits with the cache equal recomputing each row's context without one."""
    results = []
    for use_cache in (True, False):
        logits = []
        tokens = generate(model.eval(), prompts, steps, temperature=0, use_cache=use_cache,
                          on_step=lambda step_logits, new: logits.append(step_logits.clone()))
        results.append((tokens, logits))
    (cached, cached_logits), (full, full_logits) = results
    assert cached == full
    for step, (a, b) in enumerate(zip(cached_logits, full_logits, strict=True)):
        assert (a - b).abs().max().item() <= 1e-5, f"step {step}: logits differ by {(a - b).abs().max().item():.2e}"


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_generation_streams_past_block_size_with_a_ring_cache(spec):
    """Every layer windowed with RoPE: generation goes on past block_size (16) without prefilling again, each
    layer holding only its window, and equals the whole sequence run through the model; left-padded rows too."""
    model = windowed(spec, 5)
    assert model.streams
    cache = model.new_cache(2, max_len=100)
    assert all(isinstance(layer, WindowCache) and layer.tensors[0].size(1) == 5 for layer in cache.layers)
    assert_generation_equals_recomputation(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], steps=30)
    prompt = torch.randint(0, 97, (1, 40))  # the model itself runs past block_size
    with torch.no_grad():
        cache = model.eval().new_cache(1, max_len=40)
        steps = [model(prompt[:, :9], cache=cache).logits] + [model(prompt[:, t:t + 1], cache=cache).logits
                                                              for t in range(9, 40)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(prompt).logits, rtol=1e-5, atol=1e-5)


def test_window_wider_than_block_size_streams_with_a_ring_of_the_window():
    model = windowed(SPECS["gqa"], 24, n_layer=1)
    assert model.streams
    assert_generation_equals_recomputation(model, [[1, 2, 3], [4, 5, 6, 7, 8]], steps=40)


@pytest.mark.parametrize("layers,pos_emb", [([SPECS["gqa"] | {"window": 4}] * 2, "learn"),
                                            ([SPECS["gqa"] | {"window": 4}, SPECS["mla"]], "rope")],
                         ids=["learned-positions", "one-full-layer"])
def test_models_that_do_not_stream_prefill_again_at_block_size(layers, pos_emb):
    """Learned positions have block_size rows, and a full-attention layer's cache grows with the sequence: such
    models slide their context at block_size as before, and the ring caches follow."""
    model = build_model(make_config(layers, pos_emb=pos_emb, block_size=16))
    assert not model.streams
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert_generation_equals_recomputation(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], steps=20)


def test_cache_bytes_count_at_most_the_window():
    model = build_model(make_config([SPECS["gqa"] | {"window": 4}, SPECS["gqa"]], pos_emb="rope"))
    per_token = 2 * 2 * (48 // 4) * 4  # keys and values, 2 KV heads of 12, fp32: per layer
    assert model.cache_bytes_per_token() == 2 * per_token
    assert model.cache_bytes(3) == 2 * 3 * per_token
    assert model.cache_bytes(100) == 4 * per_token + 100 * per_token


# --- the schedule --------------------------------------------------------------------------------------------------


def schedule_config(*flags: str) -> Trainconfig:
    return parse(["--window", "1728", "--window_schedule", "linear", *flags])[1]


def expected_window(step: int, cfg: Trainconfig) -> int:
    """The definition: the line from 0 at step 0 to window_max at the last step, rounded up to a multiple of
    window_block, at least one block, at most window_max."""
    line = Fraction(cfg.window_max * step, max(1, cfg.max_iters - 1))
    return min(cfg.window_max, max(cfg.window_block, math.ceil(line / cfg.window_block) * cfg.window_block))


def test_linear_schedule_values():
    cfg = schedule_config("--max_iters", "101")  # window_max 1728, window_block 128: the speedrun's
    assert [scheduled_window(step, cfg) for step in (0, 1, 7, 8, 50, 99, 100)] == [128, 128, 128, 256, 896, 1728,
                                                                                    1728]
    values = [scheduled_window(step, cfg) for step in range(101)]
    assert values == [expected_window(step, cfg) for step in range(101)]
    assert values == sorted(values) and all(v % 128 == 0 or v == 1728 for v in values)
    short = schedule_config("--max_iters", "1")
    assert scheduled_window(0, short) == 128
    assert scheduled_window(5, parse([])[1]) is None  # no schedule: the windows stay


@pytest.mark.parametrize("argv,message", [
    (["--window", "0"], "window=0 must be >= 1 (tokens a query attends to, itself included)"),
    (["--attn", "mla", "--kv_latent_dim", "16", "--window", "-2"], "window=-2 must be >= 1"),
    (["--window", "64", "--window_schedule", "linear", "--window_block", "0"], "window_block=0 must be >= 1"),
    (["--window", "64", "--window_schedule", "linear", "--window_max", "64", "--window_block", "128"],
     "window_max=64 must be >= window_block=128; raise --window_max or lower --window_block"),
    (["--window_schedule", "linear"], "window_schedule=linear grows sliding windows but no layer sets window"),
    (["--window", "4096", "--window_schedule", "linear"],
     "window_max=1728 is below the window=4096 of a layer, so training would end short of it; set --window_max 4096"),
])
def test_refusals_are_one_line(argv, message):
    with pytest.raises(ConfigError) as error:
        parse(argv)
    assert str(error.value).endswith(message) or message in str(error.value)
    assert "\n" not in str(error.value)


def test_flash_refuses_a_schedule_at_config_time(monkeypatch):
    monkeypatch.setattr(kernels, "FLASH", {2: None})  # as if flash-attn 2 were installed
    with pytest.raises(ConfigError, match="attn_backend=flash takes a fixed window, but window_schedule=linear"):
        parse(["--window", "64", "--window_schedule", "linear", "--attn_backend", "flash", "--device", "cuda"])
    parse(["--window", "64", "--attn_backend", "flash", "--device", "cuda"])


def test_export_of_a_window_goes_to_a_windowed_family_and_mla_windows_are_refused():
    config = make_config(SPECS["gqa"] | {"window": 8, "non_linearity": "swiglu"}, pos_emb="rope", norm="rms")
    assert family(config) == "mistral"  # one window on every layer: Mistral's sliding_window
    config = make_config(SPECS["mla"] | {"window": 8, "non_linearity": "swiglu"}, pos_emb="rope", norm="rms")
    with pytest.raises(ConfigError, match="cannot export"):
        family(config)


class FixedBatches:
    """The same batch of inputs and targets (B, T) every time."""

    batching = None  # the plain next-token rows: no extra parts

    def __init__(self):
        self.x, self.y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))

    def next_batch(self):
        return self.x, self.y


@pytest.mark.parametrize("spec", [SPECS["gqa"], SPECS["mla"]], ids=["gqa", "mla"])
def test_schedule_changes_the_window_without_recompiling(spec):
    """The model compiled whole once: its losses follow the scheduled window (equal to the eager model's) and
    training steps across window changes compile no second graph."""
    torch._dynamo.reset()
    counters.clear()
    model = windowed(spec, 8, n_layer=1).train()
    schedule_windows(model, 2)
    batches, cfg = FixedBatches(), Trainconfig(device="cpu")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    optimizer = build_optimizer(model, cfg, CPU)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses = []
            for limit in (2, 5, 8, 3):
                schedule_windows(model, limit)
                with torch.no_grad():
                    eager = model(batches.x, batches.y).loss
                result = train_step(model, compiled, batches, 1, Precision(CPU, torch.float32, None), optimizer, cfg,
                                    Distributed())
                torch.testing.assert_close(result.loss, eager, rtol=1e-5, atol=1e-5)
                losses.append(result.loss.item())
        assert counters["stats"]["unique_graphs"] == 1
        assert len(set(losses)) == 4
    finally:
        torch._dynamo.reset()


SMALL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_kv_heads", "2", "--attn", "gqa", "--pos_emb",
         "rope", "--window", "24", "--block_size", "32", "--batch_size", "4", "--total_batch_size_str", "4*32",
         "--window_schedule", "linear", "--window_max", "24", "--window_block", "8", "--max_iters", "6",
         "--learning_rate", "3e-3", "--warmup_steps", "2", "--log_interval", "1", "--eval", "--eval_interval", "3",
         "--eval_iters", "2", "--dropout", "0.1"]


def run(char_data, tmp_path, name: str, monkeypatch, *extra: str) -> tuple[dict, dict]:
    """Trains SMALL; returns {step: (loss, grad_norm, val_loss)} and {step: the layers' limits during the step}."""
    limits = {}
    real = loop.apply_window_schedule

    def recording(model, step, cfg):
        real(model, step, cfg)
        limits[step] = [m.limit.item() for m in model.modules() if isinstance(m, SlidingWindow)]

    monkeypatch.setattr(loop, "apply_window_schedule", recording)
    argv = SMALL + ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--wandb_run_name", name, *extra]
    train(*parse(argv))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"], r.get("val_loss")) for r in rows}, limits


def test_training_with_the_schedule_resumes_exactly(char_data, tmp_path, monkeypatch):
    """A run grows its windows 8, 8, 16, 16, 24, 24 (both layers); resumed from step 3 it continues with the same
    windows and the same losses."""
    full, limits = run(char_data, tmp_path, "full", monkeypatch, "--save_model", "--ckpt_interval", "3")
    assert limits == {0: [8, 8], 1: [8, 8], 2: [16, 16], 3: [16, 16], 4: [24, 24], 5: [24, 24]}
    assert all(math.isfinite(loss) for loss, _, _ in full.values())
    checkpoint = tmp_path / "full" / "checkpoints" / "step_0000003"
    resumed, resumed_limits = run(char_data, tmp_path, "second", monkeypatch, "--resume", str(checkpoint))
    assert resumed_limits == {step: limits[step] for step in (3, 4, 5)}
    assert resumed == {step: full[step] for step in (3, 4, 5)}


def test_config_fields_travel_in_the_config():
    model_config, cfg = parse(["--window", "64", "--window_schedule", "linear", "--window_max", "256",
                               "--window_block", "64"])
    assert model_config.layers[0].window == 64 and (cfg.window_max, cfg.window_block) == (256, 64)
    assert dataclasses.asdict(cfg)["window_schedule"] == "linear"
