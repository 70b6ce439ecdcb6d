"""Hyena (attn: hyena): the FFT convolution against a direct one, the operator against a transcription of its
definition (causal and two-sided), filters that depend on the lag alone, causality, gradients, parameter counts,
cached decoding (one token, chunks, left padding, speculative rollback), the config's refusals and a training run."""
import json
import math

import pytest
import torch

import train as train_entry
from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import ConfigError
from llm.generate import generate
from llm.model import LLM, build_model
from llm.model.mixers.hyena import HIDDEN_LAYERS, Hyena, fft_conv
from llm.speculative import speculative_generate
from tests.conftest import make_config

ORDER2 = dict(attn="hyena", hyena_filter_order=12)
ORDER3 = dict(attn="hyena", hyena_order=3, hyena_filter_order=8, hyena_emb_dim=5, hyena_short_filter=4,
              hyena_sin_freq=10.0, hyena_decay_shift=0.05, hyena_fast_decay=0.2, hyena_slow_decay=2.0)
SPECS = [pytest.param(ORDER2, id="order2"), pytest.param(ORDER3, id="order3")]


def build(spec: dict, n_embd: int = 8, block_size: int = 16, bias: bool = False) -> Hyena:
    """A lone Hyena layer in fp64 (PyTorch's default initialisation: larger values than the model's)."""
    config = make_config(spec, n_embd=n_embd, n_layer=1, block_size=block_size, bias=bias)
    return Hyena(config.layers[0], config).double().eval()


def direct_conv(u: torch.Tensor, h: torch.Tensor, causal: bool) -> torch.Tensor:
    """y_t = sum_s h[|t - s|] u_s over s <= t (causal) or every s, one output at a time: u (B, T, C), h (T, C)."""
    T = u.size(1)
    y = torch.zeros_like(u)
    for t in range(T):
        for s in range(T if not causal else t + 1):
            y[:, t] += h[abs(t - s)] * u[:, s]
    return y


def reference_filters(layer: Hyena, length: int) -> torch.Tensor:
    """The implicit filters (length, N-1, C) from the definition: features [t, cos(2π f l / L), -sin(2π f l / L)]
    with t = l / (L - 1), L = block_size, f spaced from 1e-4 to bands - 1; the Sin MLP; the decay window
    exp(-t |delta_c|) + shift, delta_c spaced from ln(0.01) / slow to ln(0.01) / fast over the channels."""
    f = layer.filter
    L, E = f.block_size, f.emb_dim
    bands = (E - 1) // 2
    freqs = [1e-4 + i * (bands - 1 - 1e-4) / (bands - 1) for i in range(bands)] if bands > 1 else [1e-4]
    rows = []
    for lag in range(length):
        angles = [2 * math.pi * q * lag / L for q in freqs]
        rows.append([lag / (L - 1)] + [math.cos(a) for a in angles] + [-math.sin(a) for a in angles])
    features = torch.tensor(rows, dtype=torch.float64)  # (length, E)
    h = features
    for linear in f.hidden:
        h = torch.sin(f.frequency * (h @ linear.weight.T + linear.bias))
    h = h @ f.out.weight.T  # (length, M)
    M = h.size(1)
    slow, fast = math.log(0.01) / f.slow_decay, math.log(0.01) / f.fast_decay
    rates = torch.tensor([abs(slow + c * (fast - slow) / (M - 1)) for c in range(M)], dtype=torch.float64)
    h = h * (torch.exp(-features[:, :1] * rates) + f.shift)
    return h.view(length, layer.order - 1, layer.width)


def reference_hyena(layer: Hyena, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The operator from its definition: projections, the short depthwise convolution tap by tap, then for each
    order step u = z * x_{N-1-o}, z = sum_s h_o[|t - s|] u_s + D_o u_t, and y = c_proj(z * x_0)."""
    B, T, C = x.shape
    N, K = layer.order, layer.kernel
    proj = x @ layer.in_proj.weight.T  # (B, T, W)
    if layer.in_proj.bias is not None:
        proj = proj + layer.in_proj.bias
    taps = layer.short_filter.weight[:, 0]  # (W, K)
    first = K - 1 if causal else (K - 1) // 2  # how many earlier tokens tap 0 reaches back
    streams = torch.zeros_like(proj)
    for t in range(T):
        for j in range(K):
            s = t - first + j
            if 0 <= s < T:
                streams[:, t] += taps[:, j] * proj[:, s]
    if layer.short_filter.bias is not None:
        streams = streams + layer.short_filter.bias
    gates = [streams[..., i * C:(i + 1) * C] for i in range(N + 1)]
    h, D = reference_filters(layer, T), layer.skip.view(N - 1, C)
    z = gates[N]
    for o in range(N - 1):
        u = z * gates[N - 1 - o]
        z = direct_conv(u, h[:, o], causal) + D[o] * u
    y = (z * gates[0]) @ layer.c_proj.weight.T
    return y if layer.c_proj.bias is None else y + layer.c_proj.bias


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 2, 7, 16])
def test_fft_conv_equals_the_direct_convolution(causal, T):
    u, h = torch.randn(2, T, 5, dtype=torch.float64), torch.randn(T, 5, dtype=torch.float64)
    torch.testing.assert_close(fft_conv(u, h, causal), direct_conv(u, h, causal), rtol=0, atol=1e-10)
    torch.testing.assert_close(fft_conv(u.float(), h.float(), causal), direct_conv(u, h, causal).float(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_operator_equals_its_definition(spec, causal, bias):
    layer = build(spec, bias=bias)
    layer.causal = causal
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, torch.arange(11)[None]), reference_hyena(layer, x, causal),
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS)
def test_filters_depend_on_the_lag_alone(spec):
    layer = build(spec)
    with torch.no_grad():
        long, short = layer.filter(16), layer.filter(5)
    assert long.shape == (16, layer.order - 1, 8)
    # equal up to the last bit of fp64: vectorised sin/exp round a tail of 5 elements as scalars on some CPUs
    torch.testing.assert_close(short, long[:5], rtol=0, atol=1e-14)
    window = layer.filter.shift + torch.exp(-torch.tensor(15 / 15) * abs(math.log(0.01) / layer.filter.fast_decay))
    assert window < 0.07  # the fastest channel has decayed to about 1e-2 (+ shift) at t = 1


@pytest.mark.parametrize("spec", SPECS)
def test_model_is_causal_and_gradients_reach_every_parameter(spec):
    model = build_model(make_config(spec, n_embd=16, n_layer=2, block_size=16))
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, idx)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model = hyena_model(spec).double()
    with torch.no_grad():
        full = model(idx).logits  # (B, T, V)
        assert full.shape == (2, 16, 97)
        for t in range(16):
            changed = idx.clone()
            changed[:, t] = (idx[:, t] + 1) % 97
            after = model(changed).logits
            assert ((after[:, :t] - full[:, :t]).abs() <= 1e-12).all(), t
            assert (after[:, t] - full[:, t]).abs().max() > 1e-6, t


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_parameter_count(spec, bias):
    config = make_config(spec, n_embd=16, n_layer=1, bias=bias)
    block = config.layers[0]
    C, N, K = 16, block.hyena_order, block.hyena_short_filter
    E, F = block.hyena_emb_dim, block.hyena_filter_order
    W = (N + 1) * C
    projections = C * W + C * C + bias * (W + C)  # in_proj, c_proj
    short = W * K + bias * W
    implicit = (E * F + F) + (HIDDEN_LAYERS - 1) * (F * F + F) + F * (N - 1) * C + F  # MLP, Sin frequencies
    skip = (N - 1) * C
    layer = Hyena(block, config)
    assert sum(p.numel() for p in layer.parameters()) == projections + short + implicit + skip


def hyena_model(spec: dict, **fields) -> LLM:
    """A two-layer Hyena model in eval mode whose filter MLPs are redrawn at std 0.5 (at the model's std-0.02
    initialisation the long filters are ~1e-6 and the long convolutions barely reach the logits)."""
    model = build_model(make_config(spec, n_embd=16, n_layer=2, block_size=16, **fields)).eval()
    for block in model.blocks:
        for p in block.attn.filter.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return model


def decode(model: LLM, idx: torch.Tensor, chunks: list[int], pad: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of idx (B, T) run through the cache in chunks of the given sizes."""
    cache = model.new_cache(idx.size(0), pad)
    logits, start = [], 0
    for size in chunks:
        logits.append(model(idx[:, start:start + size], cache=cache).logits)
        start += size
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 14, [6, 1, 1, 4, 2], [14]])
@pytest.mark.parametrize("spec", SPECS)
def test_cached_decoding_equals_the_full_forward(spec, chunks):
    model = hyena_model(spec)
    idx = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(decode(model, idx, chunks), model(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_left_padded_rows_decode_as_they_would_alone(spec, bias):
    model = hyena_model(spec, bias=bias)
    rows = [torch.randint(0, 97, (n,)) for n in (13, 6, 9)]
    pad = torch.tensor([13 - len(r) for r in rows])
    idx = torch.stack([torch.cat((torch.full((int(p),), 5), r)) for p, r in zip(pad, rows)])  # (3, 13)
    with torch.no_grad():
        padded = decode(model, idx, [9, 1, 1, 2], pad)  # the prompt ends 4 tokens early, then decoding
        for b, row in enumerate(rows):
            alone = model(row[None]).logits[0]  # (n, V)
            torch.testing.assert_close(padded[b, int(pad[b]):], alone, rtol=1e-5, atol=1e-5)


def test_generation_and_cache_size():
    model = build_model(make_config(ORDER3, n_embd=16, n_layer=2, block_size=16)).eval()
    assert model.cache_bytes_per_token() == 2 * (2 * 3 * 16) * 4  # layers x 2N·C values x fp32
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert generate(model, prompts, 5, temperature=0) == generate(model, prompts, 5, temperature=0, use_cache=False)


def test_speculative_decoding_rolls_back_hyena_caches():
    """Rejected drafts truncate the cache; re-verified tokens overwrite the stored inputs, so the tokens equal greedy
    decoding."""
    model = build_model(make_config([ORDER2, ORDER3], mtp="sequential", n_mtp_tokens=2, n_embd=16, block_size=32)).eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9)]
    assert speculative_generate(model, prompts, 16) == generate(model, prompts, 16, temperature=0)


@pytest.mark.parametrize("flags,message", [
    (["--hyena_order", "1"], "hyena_order=1 must be >= 2"),
    (["--hyena_filter_order", "0"], "hyena_filter_order=0 must be >= 1"),
    (["--hyena_emb_dim", "4"], "hyena_emb_dim=4 must be odd and >= 3"),
    (["--hyena_emb_dim", "1"], "hyena_emb_dim=1 must be odd and >= 3"),
    (["--hyena_short_filter", "0"], "hyena_short_filter=0 must be >= 1"),
    (["--hyena_fast_decay", "0"], "hyena_fast_decay=0.0 must be > 0"),
    (["--hyena_slow_decay", "-1"], "hyena_slow_decay=-1.0 must be > 0"),
    (["--hyena_decay_shift", "-0.1"], "hyena_decay_shift=-0.1 must be >= 0"),
    (["--mod"], "mod=true with attn='hyena'"),
])
def test_validation_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(["--attn", "hyena", *flags])


def test_bad_flag_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        train_entry.main(["--attn", "hyena", "--hyena_order", "1"])
    err = capsys.readouterr().err.strip()
    assert err == "error: hyena_order=1 must be >= 2 (two gates and one long convolution at least); raise it"


def test_trains_through_train_py_and_reloads(char_data, tmp_path):
    train_entry.main(["--attn", "hyena", "--hyena_filter_order", "16", "--data_dir", str(char_data.parent),
                      "--out_dir", str(tmp_path), "--n_embd", "32", "--n_layer", "2", "--block_size", "32",
                      "--batch_size", "4", "--total_batch_size_str", "2*4*32", "--max_iters", "8",
                      "--log_interval", "7", "--learning_rate", "3e-3", "--warmup_steps", "2", "--save_model"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    _, model, _ = load_trained(str(tmp_path / "run"))
    assert type(model.blocks[0].attn) is Hyena and model.config.layers[0].hyena_filter_order == 16
