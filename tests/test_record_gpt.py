"""The record GPT's parts (value embeddings, x0 mixing, U-net skips, block windows and their scaled schedule, logit
soft-capping): each reduces to the plain GPT at its neutral setting, and each keeps causality and cached decoding."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from llm.cli import parse
from llm.config import ConfigError, Trainconfig
from llm.hf import family
from llm.model import build_model
from llm.model.chunked_loss import linear_cross_entropy
from llm.model.mixers import attention as kernels
from llm.model.mixers.attention import SlidingWindow, schedule_windows
from llm.model.shortcuts import Shortcuts, value_embed_layers
from llm.model.windows import in_window
from llm.precision import Precision
from llm.sweep import SweepOptions, plan
from llm.train.distributed import Distributed
from llm.train.optim import build_optimizer
from llm.train.step import train_step
from llm.train.window_schedule import apply_window_schedule, scheduled_window
from tests.conftest import REPO, make_config
from tests.test_sliding_window import FixedBatches, assert_generation_equals_recomputation

GQA = dict(attn="gqa", n_head=4, n_kv_heads=2)
OPTIONS = {
    "value_embeds": dict(value_embeds=2),
    "x0_mix": dict(x0_mix=True),
    "unet_skips": dict(unet_skips=True),
    "logit_softcap": dict(logit_softcap=3.0),
    "block_windows": dict(window_unit=4),
    "all": dict(value_embeds=2, x0_mix=True, unet_skips=True, logit_softcap=3.0, window_unit=4),
}


def record_model(spec: dict | None = None, n_layer: int = 5, **fields):
    """A RoPE, RMSNorm GPT of n_layer GQA layers (windowed by 8 tokens when window_unit is given) with `fields`."""
    spec = {**GQA, **({"window": 8} if fields.get("window_unit") else {}), **(spec or {})}
    config = make_config(spec, n_layer=n_layer, pos_emb="rope", norm="rms", **fields)
    return build_model(config)


def perturb(model) -> None:
    """Moves every mixing weight off its initial value, so that each part changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lambdas" in name or "skip_weights" in name:
                param.add_(torch.rand_like(param) * 0.5)


# --- each part at its neutral setting is the plain GPT ------------------------------------------------------------


def test_the_parts_at_their_neutral_settings_are_the_plain_gpt():
    """Value lambdas (1, 0), x0 lambdas (1, 0), skip weights 0 and no cap give exactly the plain GPT's logits from
    the same weights, the value tables notwithstanding."""
    plain = record_model().eval()
    record = record_model(value_embeds=2, x0_mix=True, unet_skips=True).eval()
    missing, unexpected = record.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("lambdas" in k or "skip_weights" in k or "value_embeds" in k for k in missing)
    with torch.no_grad():
        for name, param in record.named_parameters():
            if "lambdas" in name:
                param.copy_(torch.tensor([1.0, 0.0]).expand_as(param))
            elif "skip_weights" in name:
                param.zero_()
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(record(idx).logits, plain(idx).logits, rtol=0, atol=0)
        perturb(record)
        assert (record(idx).logits - plain(idx).logits).abs().max() > 1e-3


def test_a_cap_far_above_the_logits_is_no_cap_and_the_cap_bounds_them():
    plain = record_model().eval()
    capped = record_model(logit_softcap=1e6).eval()
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(capped(idx).logits, plain(idx).logits, rtol=0, atol=1e-6)
        tight = record_model(logit_softcap=0.5).eval()
        tight.load_state_dict(plain.state_dict())
        logits = tight(idx).logits
        assert logits.abs().max() <= 0.5
        torch.testing.assert_close(logits, 0.5 * torch.tanh(plain(idx).logits / 0.5))


def test_block_windows_of_at_least_the_sequence_are_full_attention():
    plain = record_model().eval()
    idx = torch.randint(0, 97, (2, 32))
    for window in (32, 64):
        model = record_model({"window": window}, window_unit=8).eval()
        model.load_state_dict(plain.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(idx).logits, plain(idx).logits, rtol=0, atol=1e-6)


# --- soft-capping in the chunked loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_loss_with_a_cap_equals_cross_entropy_of_the_capped_logits(weighted):
    """Loss and both gradients (fp64) against autograd through c * tanh(z / c), padding rows and ignored targets
    included, over several chunks."""
    torch.manual_seed(0)
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)  # 13 real rows, 3 padding
    targets = torch.randint(0, 13, (23,))
    targets[[3, 17]] = -1
    weights = torch.rand(23, dtype=torch.float64) if weighted else None
    loss = linear_cross_entropy(hidden, weight, targets, 13, -1, chunk=5, token_weights=weights, softcap=2.0)
    grads = torch.autograd.grad(loss, (hidden, weight))
    logits = 2.0 * torch.tanh((hidden @ weight.T)[:, :13] / 2.0)
    per_token = F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")
    expected = (per_token * (1 if weights is None else weights)).sum() / (targets != -1).sum()
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_records_sigmoid_cap_is_the_tanh_cap_shifted():
    """30 * sigmoid(z / 7.5) = 15 * tanh(z / 15) + 15: the same softmax, so the same cross-entropy."""
    z = torch.randn(6, 50, dtype=torch.float64) * 20
    targets = torch.randint(0, 50, (6,))
    torch.testing.assert_close(F.cross_entropy(30 * torch.sigmoid(z / 7.5), targets),
                               F.cross_entropy(15 * torch.tanh(z / 15), targets), rtol=0, atol=1e-12)


# --- block windows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_block_window_rule_equals_its_definition(causal):
    """Query q sees key k when k <= q (causal) and the blocks of 4 tokens they fall in are fewer than 3 apart."""
    q, k = torch.arange(20)[:, None], torch.arange(20)[None]
    dense = torch.tensor([[(kk <= qq or not causal) and abs(qq // 4 - kk // 4) < 3 for kk in range(20)]
                          for qq in range(20)])
    assert torch.equal(in_window(q, k, 12, causal, 4), dense)
    assert torch.equal(kernels.window_band(20, 20, 12, causal, torch.device("cpu"), 4), dense)
    assert torch.equal(in_window(q, k, torch.tensor(12), causal, 4), dense)  # a scheduled (tensor) window


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("T,S", [(20, 20), (7, 20)])
def test_block_window_kernels_equal_dense_masked_attention(backend, T, S, eager_flex):
    """SDPA's band and FlexAttention's block mask against attention under the dense mask, keys from a cache
    included (the queries are the last T of S positions)."""
    q, k, v = torch.randn(2, T, 4, 8), torch.randn(2, S, 2, 8), torch.randn(2, S, 2, 8)
    dense = in_window(torch.arange(S - T, S)[:, None], torch.arange(S)[None], 8, True, 4)  # (T, S)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=dense, enable_gqa=True).transpose(1, 2)
    with torch.no_grad():
        got = kernels.causal_attention(q, k, v, backend, 0.0, window=8, window_unit=4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_scaled_schedule_keeps_the_records_long_and_short_windows():
    """Long windows of 14 blocks of 128 and short ones of 7: at a limit of n blocks the long layer gets n blocks and
    the short one n // 2 (at least one), as the record schedules them; the linear schedule caps instead."""
    long, short = SlidingWindow(1792, 128), SlidingWindow(896, 128)
    for n in range(1, 15):
        for window, blocks in ((long, n), (short, max(1, n // 2))):
            window.schedule(128 * n, final=1792)
            assert window.current().item() == 128 * blocks
    short.schedule(128 * 3)
    assert short.current().item() == 384


def test_the_scaled_schedule_in_training_steps():
    """Layers of 16 and 8 tokens in blocks of 4 under --window_schedule scaled: the long layer follows the limit, the
    short one half of it in whole blocks, and both reach their own windows at the last step."""
    model = build_model(make_config([{**GQA, "window": 16}, {**GQA, "window": 8}], pos_emb="rope", window_unit=4))
    cfg = Trainconfig(window_schedule="scaled", window_max=16, window_block=4, max_iters=7)
    for step in range(7):
        apply_window_schedule(model, step, cfg)
        limit = scheduled_window(step, cfg)
        assert [b.attn.window.current().item() for b in model.blocks] == [limit, 4 * max(1, limit // 8)]
    assert limit == 16


@pytest.mark.parametrize("argv,message", [
    (["--window", "256", "--window_unit", "128", "--window_schedule", "linear", "--window_block", "64"],
     "window_block=64 is not a multiple of window_unit=128, so window_schedule=linear would cut a window inside a "
     "block; make it a multiple of 128 or use --window_schedule scaled"),
    (["--window", "256", "--window_unit", "128", "--window_schedule", "scaled", "--window_max", "256"], None),
    (["--window", "256", "--window_unit", "96"],
     "layer 0: window=256 is not a multiple of window_unit=96; give windows in whole blocks of 96 tokens"),
])
def test_schedule_flags(argv, message):
    if message is None:
        assert parse(argv)[1].window_schedule == "scaled"
        return
    with pytest.raises(ConfigError) as error:
        parse(argv)
    assert str(error.value).endswith(message)


def test_cached_generation_streams_block_windows():
    """Every layer in block windows of 2 x 4 tokens with RoPE: generation streams past block_size with a ring of the
    window, its logits equal to recomputing the whole sequence."""
    model = build_model(make_config({**GQA, "window": 8}, n_layer=2, pos_emb="rope", block_size=16, window_unit=4))
    assert model.streams
    assert_generation_equals_recomputation(model, [[5, 9, 2], [7]], 30)


# --- causality, cached decoding, gradients, the U-net pairing -------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
def test_causal_with_each_part(option):
    model = record_model(**option).eval()
    perturb(model)
    idx = torch.randint(0, 97, (2, 32))
    changed = idx.clone()
    changed[:, 13] = (idx[:, 13] + 1) % 97
    with torch.no_grad():
        diff = (model(changed).logits - model(idx).logits).abs().amax(dim=(0, 2))  # (T,)
    assert diff[:13].max() == 0 and diff[13:].min() > 0


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
def test_cached_decoding_equals_the_full_pass_with_each_part(option):
    model = record_model(**option).eval()
    perturb(model)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(2)
        steps = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 11), (11, 12), (12, 21), (21, 30))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_compiles_whole_once_while_the_scaled_schedule_grows_its_windows():
    """Every part at once, trained by Muon through the compiled model: one graph across window changes, each step's
    loss that of the eager model at that window."""
    torch._dynamo.reset()
    counters.clear()
    model = build_model(make_config([{**GQA, "window": 8}, {**GQA, "window": 4}] * 2, pos_emb="rope", norm="rms",
                                    block_size=16, **{**OPTIONS["all"], "window_unit": 4})).train()
    cfg = Trainconfig(device="cpu", optimizer="muon", window_schedule="scaled", window_max=8, window_block=4)
    batches, optimizer = FixedBatches(), build_optimizer(model, cfg, torch.device("cpu"))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for limit in (4, 8, 4):
                schedule_windows(model, limit, final=8)
                with torch.no_grad():
                    eager = model(batches.x, batches.y).loss
                result = train_step(model, compiled, batches, 1, Precision(torch.device("cpu"), torch.float32, None),
                                    optimizer, cfg, Distributed())
                torch.testing.assert_close(result.loss, eager, rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


def test_gradients_reach_every_part():
    model = record_model(**OPTIONS["all"])
    idx = torch.randint(0, 97, (2, 32))
    out = model(idx, idx)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_value_embedding_layers_and_parameters():
    """The record's 012 ... 012 pattern over 12 layers; each table is the padded vocabulary by the values' width,
    counted in the parameters and left out of the FLOPs."""
    assert value_embed_layers(12, 3) == {0: 0, 1: 1, 2: 2, 9: 0, 10: 1, 11: 2}
    assert value_embed_layers(5, 2) == {0: 0, 1: 1, 3: 0, 4: 1}
    plain, record = record_model(), record_model(value_embeds=2)
    widths = 2 * 12  # two key/value heads of 12
    extra = 2 * 128 * widths + 5 * 2  # tables over 128 padded rows, two value lambdas per attention layer
    assert record.get_num_params()[0] - plain.get_num_params()[0] == extra
    assert record.flops_per_token() - plain.flops_per_token() == 6 * 5 * 2
    shared = record.value_embeds(torch.tensor([[3, 4]]), 5)
    assert shared[0] is shared[3] and shared[2] is None and shared[1] is shared[4]


def test_unet_skips_pair_each_decoder_layer_with_its_encoder_layer():
    """With 5 layers, block 3 adds block 1's output and block 4 block 0's (LIFO); the middle block takes none."""
    shortcuts = Shortcuts(make_config(n_layer=5, unet_skips=True))
    with torch.no_grad():
        shortcuts.skip_weights.copy_(torch.tensor([10.0, 100.0]))
    skips, inputs = [], []
    x = torch.zeros(1)
    for i in range(5):
        x = shortcuts.before_block(i, x, x, skips)
        inputs.append(x.item())
        x = torch.full((1,), float(i + 1))  # block i's output
        shortcuts.after_block(i, x, skips)
    assert inputs == [0.0, 1.0, 2.0, 3.0 + 10 * 2.0, 4.0 + 100 * 1.0]


# --- refusals --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,message", [
    (dict(value_embeds=3, n_layer=5), "value_embeds=3 tables feed the first and the last 3 layers"),
    (dict(value_embeds=-1), "value_embeds=-1 must be >= 0"),
    (dict(unet_skips=True, n_layer=1), "unet_skips pairs the first n_layer // 2 layers"),
    (dict(logit_softcap=0.0), "logit_softcap=0.0 must be > 0"),
    (dict(logit_softcap=5.0, objective="mdlm"), "logit_softcap is read by the clm and mlm losses"),
    (dict(window_unit=0), "window_unit=0 must be >= 1"),
    (dict(window_unit=3, layers=dict(window=8)), "layer 0: window=8 is not a multiple of window_unit=3"),
    (dict(x0_mix=True, arch="ngpt", pos_emb="rope"), "x0_mix"),
])
def test_refusals(fields, message):
    layers = fields.pop("layers", {})
    with pytest.raises(ConfigError, match=message):
        make_config({**GQA, **layers}, **fields)


def test_the_presets_hold_the_records_layers():
    """Long and short windows per layer; flags that would change the layers are refused with the way out."""
    model, run = parse(["--preset", "record-gpt"])
    assert [b.window for b in model.layers] == [1792, 896, 896, 896, 1792, 896, 896, 1792, 896, 896, 896, 1792]
    assert (model.value_embeds, model.x0_mix, model.unet_skips, model.logit_softcap, model.window_unit) == (
        3, True, True, 15.0, 128)
    assert (run.window_schedule, run.window_max, run.optimizer, run.eval_iters) == ("scaled", 1792, "muon", 160)
    model, _ = parse(["--preset", "record-gpt-tiny"])
    assert [b.window for b in model.layers] == [128, 64, 64, 64, 64, 128]
    with pytest.raises(ConfigError, match="--n_layer 4 cannot change the 6 heterogeneous layers of --config or "
                                          "--preset"):
        parse(["--preset", "record-gpt-tiny", "--n_layer", "4"])


def test_value_embeddings_need_attention_values_of_one_width():
    with pytest.raises(ConfigError, match="layer 0: value_embeds mixes a table into its attention values"):
        make_config([{"attn": "mamba", "ffn": "none"}, GQA, GQA], value_embeds=1)
    with pytest.raises(ConfigError, match="layer 2: its values are 12 wide but layer 0 shares"):
        make_config([GQA, GQA, {**GQA, "n_kv_heads": 1}], value_embeds=1)


@pytest.mark.parametrize("option", [k for k in OPTIONS if k != "all"])
def test_export_is_refused_with_the_part_named(option):
    config = record_model(**OPTIONS[option]).config
    field = next(iter(OPTIONS[option]))
    with pytest.raises(ConfigError, match=f"cannot export: {field}=.*the record GPT's parts"):
        family(config)


def test_a_block_window_is_not_run_by_flash_attention():
    call = kernels.AttentionCall("cuda", torch.bfloat16, 64, 64, False, 0.0, True, "blocks")
    machine = kernels.Machine(frozenset({2}), (9, 0), 0)
    assert "counts windows in tokens, not in blocks" in kernels.why_not_flash(call, machine, 2)
    assert kernels.select_backend("auto", call, machine) == "flex"


def test_the_ablation_sweep_adds_one_part_at_a_time(char_data):
    """sweeps/record_gpt_cpu.yaml, as docs/benchmarks.md runs it (33 minutes: only planned here): each variant is
    the base with one part, the record all of them, the recipe nanoGPT's, each over two seeds."""
    runs = plan(SweepOptions(file=str(REPO / "sweeps" / "record_gpt_cpu.yaml")), ["--data_dir", str(char_data.parent)])
    variants = ["recipe", "base", "value_embeds", "x0_mix", "unet_skips", "logit_softcap", "block_windows", "record"]
    assert [r.name for r in runs] == [f"{v}.seed-{s}" for v in variants for s in (1337, 1)]
    configs = {r.name.split(".")[0]: parse(r.argv)[0] for r in runs}
    base, record = configs["base"], configs["record"]
    assert (base.value_embeds, base.x0_mix, base.unet_skips, base.logit_softcap, base.window_unit) == (
        0, False, False, None, 1)
    assert (record.value_embeds, record.x0_mix, record.unet_skips, record.logit_softcap, record.window_unit) == (
        2, True, True, 15.0, 16)
    assert [b.window for b in record.layers] == [64, 32, 32, 64]
    assert (configs["recipe"].pos_emb, configs["recipe"].norm) == ("learn", "layer")
