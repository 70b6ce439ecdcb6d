"""Mamba and BiMamba mixers: the chunked scan and the layer against direct references, parameters, initialisation,
cached and padded decoding, validation, the CUDA-kernel path's logic, Hugging Face parity, export and import,
hybrid stacks and a small end-to-end run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import sample
import train as train_entry
from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import ConfigError, Trainconfig
from llm.data.tokenizers import tokenizer_from_meta
from llm.export import export
from llm.generate import generate
from llm.hf import from_hf, to_hf
from llm.model import build_model
from llm.model.mixers import mamba
from llm.train.optim import build_optimizer
from tests.conftest import make_config

MAMBA = dict(attn="mamba", ffn="none", d_state=4, expand=2, d_conv=3)
PURE = dict(pos_emb="none", norm="rms")  # a pure Mamba stack, as MambaForCausalLM
GQA = dict(attn="gqa", n_head=4, n_kv_heads=2, ffn="dense", up_dim=64)


def sequential_scan(u, delta, A, B, C, state):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t, one token at a time (the paper's eq. 2a-2b
    with the zero-order-hold A and the Euler B)."""
    h, ys = state.clone(), []
    for t in range(u.size(1)):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))  # (B, D)
    return torch.stack(ys, dim=1), h


def reference_mixer(m: mamba.Mamba, x: torch.Tensor) -> torch.Tensor:
    """The Mamba block of the paper (its Figure 3) written out directly in float64, token by token."""
    w = {name: p.detach().double() for name, p in m.named_parameters()}
    x = x.double()
    xz = x @ w["in_proj.weight"].T + (w["in_proj.bias"] if "in_proj.bias" in w else 0)
    u, z = xz.chunk(2, dim=-1)  # (B, T, D)
    k, T = m.d_conv, x.size(1)
    conv = torch.zeros_like(u) + (w["conv1d.bias"] if "conv1d.bias" in w else 0)
    for t in range(T):
        for j in range(k):  # tap j reads the input j tokens back
            if t - j >= 0:
                conv[:, t] += w["conv1d.weight"][:, 0, k - 1 - j] * u[:, t - j]
    u = F.silu(conv)
    low, B, C = (u @ w["x_proj.weight"].T).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(low @ w["dt_proj.weight"].T + w["dt_proj.bias"])  # (B, T, D)
    A = -torch.exp(w["A_log"])
    y, _ = sequential_scan(u, delta, A, B, C, torch.zeros(x.size(0), m.d_inner, m.d_state, dtype=x.dtype))
    y = (y + w["D"] * u) * F.silu(z)
    return y @ w["c_proj.weight"].T + (w["c_proj.bias"] if "c_proj.bias" in w else 0)


def livened(model: torch.nn.Module) -> torch.nn.Module:
    """Larger input and selection weights, so the scan's share of each output is not negligible (at 0.02 init and
    these tiny widths it is): comparisons then check the scan, not only the skip path."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("x_proj.weight", "in_proj.weight")):
                p.normal_(std=0.3)
            elif name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------- the scan and the layer


@pytest.mark.parametrize("T", [1, 2, 7, 16, 23])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_the_sequential_recurrence(T, with_state):
    B, D, N = 2, 5, 3
    g = torch.Generator().manual_seed(T)
    f64 = dict(generator=g, dtype=torch.float64)
    u, C = torch.randn(B, T, D, **f64), torch.randn(B, T, N, **f64)
    delta = 2 * torch.rand(B, T, D, **f64)  # large steps: strong decays
    A = -4 * torch.rand(D, N, **f64)
    Bm = torch.randn(B, T, N, **f64)
    state = torch.randn(B, D, N, **f64) if with_state else None
    y, last = mamba.selective_scan(u, delta, A, Bm, C, state)
    y_ref, last_ref = sequential_scan(u, delta, A, Bm, C, torch.zeros(B, D, N, dtype=torch.float64)
                                      if state is None else state)
    assert (y - y_ref).abs().max() <= 1e-12 and (last - last_ref).abs().max() <= 1e-12


@pytest.mark.parametrize("T", [1, 2, 7, 16, 23])
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_gradients_equal_autograd_through_the_sequential_recurrence(T, with_state):
    """Autograd through the chunked scan against autograd through the one-token-at-a-time loop, in float64, with a
    loss on the outputs and on the last state (as when a cache's state is reused)."""
    B, D, N = 2, 5, 3
    g = torch.Generator().manual_seed(100 + T)
    f64 = dict(generator=g, dtype=torch.float64)
    state = torch.randn(B, D, N, **f64) if with_state else torch.zeros(B, D, N, dtype=torch.float64)
    inputs = [torch.randn(B, T, D, **f64), 2 * torch.rand(B, T, D, **f64), -4 * torch.rand(D, N, **f64),
              torch.randn(B, T, N, **f64), torch.randn(B, T, N, **f64), state]
    y_weight, last_weight = torch.randn(B, T, D, **f64), torch.randn(B, D, N, **f64)
    grads = {}
    for name, scan in (("chunked", mamba.selective_scan), ("sequential", sequential_scan)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, last = scan(*leaves[:5], leaves[5] if with_state or name == "sequential" else None)
        ((y * y_weight).sum() + (last * last_weight).sum()).backward()
        grads[name] = [t.grad for t in leaves[:5]] + ([leaves[5].grad] if with_state else [])
    assert len(grads["chunked"]) == 5 + with_state
    for ours, reference in zip(grads["chunked"], grads["sequential"]):
        assert (ours - reference).abs().max() <= 1e-10


@pytest.mark.parametrize("bias,conv_bias,dt_rank", [(False, True, None), (True, False, 2)])
def test_mixer_equals_the_direct_reference(bias, conv_bias, dt_rank):
    config = make_config(dict(MAMBA, conv_bias=conv_bias, dt_rank=dt_rank), bias=bias, **PURE)
    m = livened(mamba.Mamba(config.layers[0], config)).eval()
    x = torch.randn(2, 11, config.n_embd)
    with torch.no_grad():
        ours, ref = m(x, torch.arange(11)[None]), reference_mixer(m, x)
    assert ref.abs().max() > 0.1  # a real signal
    assert (ours.double() - ref).abs().max() <= 1e-5


def test_scan_share_of_the_output_is_checked():
    """The reference comparison would fail if the scan were dropped (D u alone), so it checks the scan."""
    config = make_config(MAMBA, **PURE)
    m = livened(mamba.Mamba(config.layers[0], config)).eval()
    x = torch.randn(2, 11, config.n_embd)
    with torch.no_grad():
        full = m(x, None)
        m.x_proj.weight[m.dt_rank + m.d_state:].zero_()  # C = 0: only the skip path is left
        skip_only = m(x, None)
    assert (full - skip_only).abs().max() > 1e-2


def test_every_parameter_gets_a_gradient_and_the_shapes_hold():
    model = build_model(make_config([MAMBA, GQA, MAMBA], **PURE))
    idx = torch.randint(0, 97, (2, 20))
    assert model(idx).logits.shape == (2, 20, 97)
    model(idx, idx).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def mamba_params(C: int, D: int, N: int, k: int, R: int, bias: bool, conv_bias: bool) -> int:
    """in_proj, conv1d, x_proj, dt_proj, A_log, D, c_proj of one Mamba mixer."""
    return (C * 2 * D + bias * 2 * D) + (D * k + conv_bias * D) + D * (R + 2 * N) + (R * D + D) + D * N + D \
        + (D * C + bias * C)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_formula(bias, tie):
    C, V, L = 48, 128, 3  # 97 rounds up to 128 rows
    config = make_config(dict(MAMBA, expand=3, d_state=5, d_conv=4), bias=bias, tie_embeddings=tie, **PURE,
                         n_layer=L, n_embd=C)
    R = math.ceil(C / 16)
    per_layer = C + mamba_params(C, 3 * C, 5, 4, R, bias, True)  # RMSNorm ln_1 and the mixer: no ln_2, no MLP
    expected = V * C * (1 if tie else 2) + L * per_layer + C
    assert build_model(config).get_num_params() == (expected, expected)
    bi = make_config(dict(MAMBA, attn="bimamba"), objective="mlm", bias=bias, n_layer=1, **PURE)
    mixer = sum(p.numel() for p in build_model(bi).blocks[0].attn.parameters())
    assert mixer == 2 * mamba_params(48, 96, 4, 3, 3, bias, True) + 2 * 48 * 48 + bias * 48


@pytest.mark.parametrize("dt_init", ["random", "constant"])
def test_time_step_initialisation_survives_model_init(dt_init):
    config = make_config(dict(MAMBA, dt_init=dt_init, dt_min=0.01, dt_max=0.2, dt_rank=4, expand=8), **PURE)
    m = build_model(config).blocks[0].attn  # after the model's generic initialisation of linear layers
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.2 * (1 + 1e-5)
    assert dt.max() / dt.min() > 5  # spread over the range (log-uniform), not a constant
    if dt_init == "constant":
        assert torch.all(m.dt_proj.weight == 4 ** -0.5)
    else:
        assert m.dt_proj.weight.abs().max() <= 4 ** -0.5 and m.dt_proj.weight.std() > 0.2 * 4 ** -0.5
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 5.0)).repeat(384, 1)) and torch.all(m.D == 1)
    floored = build_model(make_config(dict(MAMBA, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3), **PURE)).blocks[0].attn
    torch.testing.assert_close(F.softplus(floored.dt_proj.bias), torch.full((96,), 1e-3))


def test_a_log_and_d_are_not_weight_decayed():
    model = build_model(make_config(MAMBA, **PURE))
    optimizer = build_optimizer(model, Trainconfig(device="cpu"), torch.device("cpu"))
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    m = model.blocks[0].attn
    assert id(m.A_log) not in decayed and id(m.D) not in decayed and id(m.x_proj.weight) in decayed


# ---------------------------------------------------------------- generation


def test_cached_decoding_equals_the_full_forward_and_the_cache_does_not_grow():
    model = livened(build_model(make_config(MAMBA, **PURE, block_size=64))).eval()
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(2)
        steps = [model(idx[:, :9], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits
                                                           for t in range(9, 40)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    per_layer = 96 * (2 * 4 + 4 * 4)  # d_inner * ((d_conv - 1) conv inputs in fp32 + d_state fp32 states)
    assert model.cache_bytes(1) == model.cache_bytes(10_000) == 2 * per_layer
    assert model.cache_bytes_per_token() == 0


@pytest.mark.parametrize("layers", [[MAMBA, MAMBA], [MAMBA, GQA, MAMBA]], ids=["mamba", "hybrid"])
def test_left_padded_batches_decode_like_each_prompt_alone(layers):
    model = livened(build_model(make_config(layers, **PURE, block_size=32))).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [42]]
    logits = []
    batched = generate(model, prompts, 12, temperature=0, on_step=lambda step_logits, new: logits.append(step_logits))
    for row, prompt in enumerate(prompts):
        alone_logits = []
        alone = generate(model, [prompt], 12, temperature=0, on_step=lambda step_logits, new: alone_logits.append(
            step_logits))
        assert alone[0] == batched[row]
        for step, (a, b) in enumerate(zip(logits, alone_logits)):
            assert (a[row] - b[0]).abs().max() <= 1e-5, f"row {row} step {step}"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("spec,fields,message", [
    (dict(MAMBA, d_state=0), {}, "d_state=0 must be >= 1"),
    (dict(MAMBA, dt_rank=0), {}, "dt_rank=0 must be >= 1"),
    (dict(MAMBA, dt_min=0.2, dt_max=0.1), {}, "dt_min=0.2 and dt_max=0.1 must satisfy 0 < dt_min <= dt_max"),
    (dict(MAMBA, dt_init_floor=-1.0), {}, "dt_init_floor=-1.0 must be >= 0"),
    (dict(MAMBA, mod=True), {}, "mod=true with attn=mamba"),
    (MAMBA, dict(objective="mlm"), "attn=mamba reads left to right only, but objective=mlm"),
    (dict(MAMBA, attn="bimamba"), {}, "attn=bimamba reads the sequence both ways, which the causal objective=clm "
                                      "forbids; use --objective mlm, or --attn mamba"),
])
def test_bad_fields_are_one_line_errors(spec, fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        make_config(spec, **fields)
    assert "\n" not in str(error.value)


def test_cli_flags_build_a_mamba_model():
    model_config, _ = parse(["--attn", "mamba", "--ffn", "none", "--pos_emb", "none", "--d_state", "8", "--dt_rank",
                             "5", "--no_conv_bias", "--dt_init", "constant", "--vocab_size", "97"])
    block = model_config.layers[0]
    assert (block.attn, block.ffn, block.d_state, block.dt_rank, block.conv_bias, block.dt_init) == \
        ("mamba", "none", 8, 5, False, "constant")
    assert build_model(model_config).blocks[0].attn.conv1d.bias is None
    with pytest.raises(ConfigError, match="attn=bimamba reads the sequence both ways"):
        parse(["--attn", "bimamba", "--vocab_size", "97"])


# ---------------------------------------------------------------- bidirectional Mamba


def test_bimamba_is_a_forward_and_a_reversed_scan_projected_back():
    config = make_config(dict(MAMBA, attn="bimamba"), objective="mlm", **PURE)
    model = livened(build_model(config)).eval()
    bi = model.blocks[0].attn
    x = torch.randn(2, 10, config.n_embd)
    with torch.no_grad():
        ahead = reference_mixer(bi.ahead, x)  # (B, T, C) from the left
        behind = reference_mixer(bi.behind, x.flip(1)).flip(1)  # (B, T, C) from the right
        expected = torch.cat((ahead, behind), dim=-1) @ bi.c_proj.weight.double().T
        assert (bi(x, None).double() - expected).abs().max() <= 1e-5
        idx = torch.randint(0, 97, (2, 10))
        changed = idx.clone()
        changed[:, 8] = (idx[:, 8] + 1) % 97
        earlier = (model(changed).logits - model(idx).logits)[:, :8].abs().amax(dim=-1)  # (B, 8)
    assert (earlier > 1e-5).all()  # every earlier position sees the later token through the reversed scan
    out = model.train()(idx, idx)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------- the CUDA kernels' path


def kernel_conv(x, weight, bias=None, activation=None):
    """causal_conv1d_fn's contract on (B, D, T) with weight (D, k), written directly."""
    k = weight.size(1)
    out = F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None], bias, groups=x.size(1))
    return F.silu(out) if activation == "silu" else out


def kernel_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """selective_scan_fn's contract on (B, D, T) / (B, N, T) tensors, written with the sequential recurrence."""
    delta = delta.float() + delta_bias[:, None]
    delta = F.softplus(delta) if delta_softplus else delta
    y, _ = sequential_scan(u.transpose(1, 2).float(), delta.transpose(1, 2), A, B.transpose(1, 2).float(),
                           C.transpose(1, 2).float(), torch.zeros(u.size(0), u.size(1), A.size(1)))
    return ((y + u.transpose(1, 2) * D) * F.silu(z.transpose(1, 2))).transpose(1, 2)  # (B, D, T)


@pytest.mark.parametrize("kernels,device,cached,masked,expected", [
    (True, "cuda", False, False, True), (False, "cuda", False, False, False), (True, "cpu", False, False, False),
    (True, "cuda", True, False, False), (True, "cuda", False, True, False)])
def test_kernel_choice(kernels, device, cached, masked, expected):
    available = mamba.Kernels(kernel_conv, kernel_scan) if kernels else None
    assert mamba.use_kernels(available, device, cached, masked) is expected


def test_kernel_path_equals_the_pure_path(monkeypatch):
    """The code around the kernels (layouts, bias, softplus, skip, gate) with stand-ins that keep their contracts."""
    model = livened(build_model(make_config(MAMBA, **PURE))).eval()
    idx = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        pure = model(idx).logits
        calls = []
        monkeypatch.setattr(mamba, "KERNELS", mamba.Kernels(lambda *a, **k: calls.append(1) or kernel_conv(*a, **k),
                                                            kernel_scan))
        monkeypatch.setattr(mamba, "KERNEL_DEVICES", ("cpu",))
        fused = model(idx).logits
        cache = model.new_cache(2)
        model(idx, cache=cache)  # generation: the pure path
    assert len(calls) == 2 and (fused - pure).abs().max() <= 1e-5


# ---------------------------------------------------------------- Hugging Face


def hf_mamba(config) -> transformers.MambaForCausalLM:
    """MambaForCausalLM of the same shape, built from a MambaConfig written here (its slow path on CPU)."""
    block = config.layers[0]
    hf_config = transformers.MambaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        state_size=block.d_state, expand=block.expand, conv_kernel=block.d_conv,
        time_step_rank=mamba.time_step_rank(block, config), use_bias=config.bias, use_conv_bias=block.conv_bias,
        layer_norm_epsilon=config.norm_eps, tie_word_embeddings=config.tie_embeddings, use_mambapy=False)
    return transformers.MambaForCausalLM(hf_config).float().eval()


@pytest.mark.parametrize("bias,tie", [(False, True), (True, False)])
def test_weights_copied_both_ways_give_equal_logits(bias, tie, tmp_path):
    config = make_config(MAMBA, bias=bias, tie_embeddings=tie, n_layer=3, **PURE)
    ours = livened(build_model(config)).eval()
    theirs = to_hf(ours).eval()
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        exported = (ours(idx).logits - theirs(input_ids=idx).logits).abs().max().item()
    reference = hf_mamba(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    imported = from_hf(str(tmp_path)).eval()
    with torch.no_grad():
        diff = (imported(idx).logits - reference(input_ids=idx).logits).abs().max().item()
        cache = imported.new_cache(2)
        steps = torch.cat([imported(idx[:, :20], cache=cache).logits[:, -1:]] +
                          [imported(idx[:, t:t + 1], cache=cache).logits for t in range(20, 24)], dim=1)
        decoded = (steps - reference(input_ids=idx).logits[:, 19:]).abs().max().item()
    print(f"mamba parity: export {exported:.2e}, import {diff:.2e}, cached decoding {decoded:.2e}")
    assert exported <= 1e-5 and diff <= 1e-5 and decoded <= 1e-5


def test_hybrid_and_bidirectional_stacks_are_refused_for_export():
    hybrid = make_config([MAMBA, GQA], **PURE)
    with pytest.raises(ConfigError, match=r"cannot export: the layers mix attention kinds \(gqa, mamba\)"):
        to_hf(build_model(hybrid))
    with pytest.raises(ConfigError, match="cannot export: .*needs RMSNorm"):
        to_hf(build_model(make_config(MAMBA, pos_emb="none")))
    with pytest.raises(ConfigError, match="cannot export: .*attn=mamba use no positions"):
        to_hf(build_model(make_config(MAMBA, pos_emb="learn", norm="rms")))
    with pytest.raises(ConfigError, match="bidirectional"):
        to_hf(build_model(make_config(dict(MAMBA, attn="bimamba"), objective="mlm", **PURE)))


# ---------------------------------------------------------------- end to end


RUN_FLAGS = ["--batch_size", "4", "--total_batch_size_str", "4*32", "--learning_rate", "1e-2", "--warmup_steps", "2",
             "--log_interval", "5", "--save_model"]
TRAIN_FLAGS = ["--attn", "mamba", "--ffn", "none", "--pos_emb", "none", "--norm", "rms", "--d_state", "8",
               "--n_layer", "2", "--n_embd", "32", "--block_size", "32", *RUN_FLAGS]


def test_train_export_and_greedy_text_equal_transformers(char_data, tmp_path, capsys):
    """train.py trains a Mamba stack on CPU; python -m llm.export writes MambaForCausalLM, whose greedy text equals
    sample.py's; --init_from hf: fine-tunes from the export."""
    data = ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path)]
    train_entry.main(TRAIN_FLAGS + data + ["--max_iters", "150"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    out = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf) is transformers.MambaForCausalLM
    _, _, meta = load_trained(str(tmp_path / "run"))
    tokenizer = tokenizer_from_meta(meta)
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "ROMEO:", "--temperature", "0", "--max_new_tokens", "40"])
    ours = capsys.readouterr().out[:-1]  # the streamed text and one closing newline
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == "ROMEO:" + tokenizer.decode(theirs[0, prompt.size(1):].tolist())
    assert len(set(ours[len("ROMEO:"):])) >= 3  # real text, not one repeated character
    train_entry.main(RUN_FLAGS + data + ["--max_iters", "2", "--init_from", f"hf:{out}", "--wandb_run_name",
                                         "finetune"])  # the architecture comes with the weights
    _, tuned, _ = load_trained(str(tmp_path / "finetune"))
    assert tuned.config.layers[0].d_state == 8 and tuned.config.pos_emb == "none"
    first = json.loads((tmp_path / "finetune" / "metrics.jsonl").open().readline())
    assert first["loss"] < rows[0]["loss"]  # it starts from the trained weights, not from scratch


def test_hybrid_jsonl_stack_trains_is_causal_and_decodes_like_the_full_forward(char_data, tmp_path):
    """Attention every fourth layer, Mamba elsewhere, from --layer_configs_jsonl."""
    common = dict(n_head=4, up_dim=64, non_linearity="gelu")
    specs = [dict(common, attn="gqa", n_kv_heads=2, ffn="dense") if i % 4 == 3 else
             dict(common, attn="mamba", ffn="none", d_state=4) for i in range(4)]
    path = tmp_path / "hybrid.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in specs))
    flags = ["--layer_configs_jsonl", str(path), "--pos_emb", "rope", "--norm", "rms", "--n_embd", "32",
             "--block_size", "32", "--batch_size", "4", "--total_batch_size_str", "4*32", "--max_iters", "12",
             "--learning_rate", "3e-3", "--warmup_steps", "2", "--log_interval", "5", "--data_dir",
             str(char_data.parent), "--out_dir", str(tmp_path), "--save_model"]
    train_entry.main(flags)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    _, model, _ = load_trained(str(tmp_path / "run"))
    assert [type(b.attn).__name__ for b in model.blocks] == ["Mamba", "Mamba", "Mamba", "GroupedQueryAttention"]
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 11] = (idx[:, 11] + 1) % model.config.vocab_size
    with torch.no_grad():
        full = model(idx).logits
        assert (model(changed).logits[:, :11] - full[:, :11]).abs().max() <= 1e-6
        cache = model.new_cache(2)
        steps = [model(idx[:, :6], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits
                                                           for t in range(6, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    assert [type(c).__name__ for c in model.new_cache(1).layers] == ["MambaCache"] * 3 + ["KVCache"]
