"""Native sparse attention (attn: nsa): equal to a brute-force reference of the paper's definitions (explicit key
sets per query and branch, plain softmax attention), causal at block granularity, selection shared by the heads of
a KV group, gates, parameter count, gradients, decoding with padded batches, and the config's refusals."""
import math

import pytest
import torch
import torch.nn.functional as F

from llm.cli import parse
from llm.config import BlockConfig, ConfigError
from llm.generate import generate
from llm.model import build_model
from llm.model.mixers.nsa import NativeSparseAttention
from tests.conftest import make_config

SPECS = {
    "blocks_4": dict(compress_block_size=4, selection_block_size=4, num_selected_blocks=2, sliding_window_size=3),
    "strided": dict(compress_block_size=4, compress_stride=2, selection_block_size=4, num_selected_blocks=3,
                    sliding_window_size=2),
    "wide_selection": dict(compress_block_size=2, selection_block_size=6, num_selected_blocks=2,
                           sliding_window_size=4),
    "uneven": dict(compress_block_size=3, compress_stride=2, selection_block_size=5, num_selected_blocks=3,
                   sliding_window_size=5),
}


def build(spec: dict, pos_emb: str = "learn", n_head: int = 4, n_kv_heads: int = 2, bias: bool = False,
          n_embd: int = 32) -> NativeSparseAttention:
    config = make_config(dict(attn="nsa", n_head=n_head, n_kv_heads=n_kv_heads, **spec), pos_emb=pos_emb, bias=bias,
                         n_embd=n_embd, n_layer=1)
    return NativeSparseAttention(config.layers[0], config).eval()


def rotate(u: torch.Tensor, position: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE of one vector (D,) at one position, dimension i paired with i + D/2."""
    half = u.size(-1) // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / u.size(-1))
    cos, sin = angle.cos().to(u.dtype), angle.sin().to(u.dtype)
    return torch.cat((u[:half] * cos - u[half:] * sin, u[half:] * cos + u[:half] * sin))


def softmax_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple:
    """Plain attention of one query over a list of keys; zeros and no probabilities when the list is empty."""
    if not keys:
        return torch.zeros_like(q), torch.zeros(0)
    probs = torch.softmax(torch.stack(keys) @ q / math.sqrt(q.numel()), dim=0)  # (n,)
    return probs @ torch.stack(values), probs


def reference(m: NativeSparseAttention, x: torch.Tensor, rope: bool = False, causal: bool = True,
              shared_selection: bool = True) -> torch.Tensor:
    """NSA by its definitions, one query, head and branch at a time. shared_selection=False lets every head pick its
    own blocks (what NSA does not do), to show that the test can tell them apart."""
    B, T, _ = x.shape
    H, KV, D = m.n_head, m.n_kv, m.head_size
    l, d, l_sel, n, w = m.block, m.stride, m.selection_block, m.n_selected, m.window
    G = H // KV
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, T, H, D)
    k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = F.linear(x, m.kv_proj.weight, m.kv_proj.bias).view(
        B, T, 6, KV, D).unbind(2)
    gates = torch.sigmoid(F.linear(x, m.gate.weight, m.gate.bias)).view(B, T, 3, H)

    def phi(compressor, block: torch.Tensor) -> torch.Tensor:  # (l, D) -> (D,)
        hidden = F.gelu(F.linear((block + compressor.position).flatten(), compressor.up.weight, compressor.up.bias))
        return F.linear(hidden, compressor.down.weight, compressor.down.bias)

    def at(u: torch.Tensor, position: int) -> torch.Tensor:
        return rotate(u, position) if rope else u

    whole_blocks = [i for i in range(T) if i * d + l <= T]  # compressed blocks inside the sequence
    n_sel_blocks = math.ceil(T / l_sel)
    shared = [[len(set(range(i * d, i * d + l)) & set(range(j * l_sel, (j + 1) * l_sel))) / d
               for j in range(n_sel_blocks)] for i in whole_blocks]
    y = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for kv in range(KV):
            kc = {i: at(phi(m.compress_k, k_cmp[b, i * d:i * d + l, kv]), i * d + l - 1) for i in whole_blocks}
            vc = {i: phi(m.compress_v, v_cmp[b, i * d:i * d + l, kv]) for i in whole_blocks}
            for t in range(T):
                visible = [i for i in whole_blocks if i * d + l - 1 <= (t if causal else T - 1)]
                heads = range(kv * G, (kv + 1) * G)
                qs = {h: at(q[b, t, h], t) for h in heads}
                cmp = {h: softmax_attention(qs[h], [kc[i] for i in visible], [vc[i] for i in visible]) for h in heads}
                scores = {h: [sum(float(p) * shared[i][j] for p, i in zip(cmp[h][1], visible))
                              for j in range(n_sel_blocks)] for h in heads}
                group = [sum(scores[h][j] for h in heads) for j in range(n_sel_blocks)]
                for h in heads:
                    score = group if shared_selection else scores[h]
                    forced = {0, t // l_sel}
                    candidates = [j for j in range(n_sel_blocks) if j not in forced and (j * l_sel <= t or not causal)]
                    chosen = forced | set(sorted(candidates, key=lambda j: (-score[j], j))[:n - len(forced)])
                    selected = [s for s in range(T) if s // l_sel in chosen and (s <= t or not causal)]
                    window = [s for s in range(T) if (t - w < s <= t if causal else abs(s - t) < w)]
                    slc, _ = softmax_attention(qs[h], [at(k_slc[b, s, kv], s) for s in selected],
                                               [v_slc[b, s, kv] for s in selected])
                    win, _ = softmax_attention(qs[h], [at(k_win[b, s, kv], s) for s in window],
                                               [v_win[b, s, kv] for s in window])
                    y[b, t, h] = gates[b, t, 0, h] * cmp[h][0] + gates[b, t, 1, h] * slc + gates[b, t, 2, h] * win
    return F.linear(y.reshape(B, T, H * D), m.c_proj.weight, m.c_proj.bias)


def run(m: NativeSparseAttention, x: torch.Tensor) -> torch.Tensor:
    return m(x, torch.arange(x.size(1))[None])


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
def test_equals_brute_force_reference(name, pos_emb):
    m = build(SPECS[name], pos_emb, bias=pos_emb == "rope")
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(run(m, x), reference(m, x, rope=pos_emb == "rope"), rtol=0, atol=1e-5)


def test_bidirectional_form_equals_reference():
    """Under a masked-LM objective every branch sees the whole sequence: all whole compressed blocks, the top blocks
    among all, and a symmetric window."""
    m = build(SPECS["strided"])
    m.causal = False
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(run(m, x), reference(m, x, causal=False), rtol=0, atol=1e-5)


def test_selection_is_shared_by_the_heads_of_a_kv_group():
    m = build({**SPECS["blocks_4"], "num_selected_blocks": 3}, n_head=4, n_kv_heads=1)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        m.q_proj.weight.mul_(20)  # sharper compressed attention, so that heads disagree on the blocks
        out = run(m, x)
        torch.testing.assert_close(out, reference(m, x), rtol=0, atol=1e-5)
        per_head = reference(m, x, shared_selection=False)
    assert (out - per_head).abs().max() > 1e-4  # heads left alone would pick other blocks


@pytest.mark.parametrize("name", SPECS)
def test_causal_at_block_granularity(name):
    """Changing token t changes no output before t (no query sees a block that ends after it, through compression or
    selection) and changes the output at t."""
    m = build(SPECS[name], "rope")
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        before = run(m, x)
        for t in range(16):
            changed = x.clone()
            changed[:, t] += torch.randn(32)
            after = run(m, changed)
            assert torch.equal(after[:, :t], before[:, :t]), f"token {t} reached an earlier output"
            assert (after[:, t] - before[:, t]).abs().max() > 1e-4


def gate_only(m: NativeSparseAttention, branch: int) -> None:
    """Gate weights zero and biases +-30: the branch's gate is 1 and the others' 0 (to 1e-13)."""
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias.copy_(torch.full((3, m.n_head), -30.0).index_fill(0, torch.tensor(branch), 30.0).flatten())


def branch_keys(m: NativeSparseAttention, x: torch.Tensor, branch: int) -> tuple:
    """The queries (B, H, T, D) and one branch's keys and values (B, KV, T, D)."""
    B, T, _ = x.shape
    q = m.q_proj(x).view(B, T, m.n_head, m.head_size).transpose(1, 2)
    kv = m.kv_proj(x).view(B, T, 6, m.n_kv, m.head_size).transpose(1, 3)  # (B, KV, 6, T, D)
    return q, kv[:, :, 2 * branch], kv[:, :, 2 * branch + 1]


def test_gates_weigh_the_branches():
    """With only the window gate open NSA is sliding-window attention; with only the selection gate open and enough
    selected blocks to cover the sequence it is causal attention."""
    x = torch.randn(2, 12, 32)
    window = build({**SPECS["blocks_4"], "sliding_window_size": 3}, bias=True)
    gate_only(window, 2)
    full = build({**SPECS["blocks_4"], "num_selected_blocks": 3}, bias=True)
    gate_only(full, 1)
    t = torch.arange(12)
    in_window = (t[None] <= t[:, None]) & (t[None] > t[:, None] - 3)  # (T, S)
    with torch.no_grad():
        for m, branch, mask in ((window, 2, in_window), (full, 1, t[None] <= t[:, None])):
            q, k, v = branch_keys(m, x, branch)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, D)
            expected = m.c_proj(y.transpose(1, 2).reshape(2, 12, 32))
            torch.testing.assert_close(run(m, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_parameter_count(bias, n_kv_heads):
    C, H, l = 32, 4, 3
    m = build(dict(compress_block_size=l), n_head=H, n_kv_heads=n_kv_heads, bias=bias, n_embd=C)
    KV, D = n_kv_heads or H, C // H
    weights = C * H * D + 6 * C * KV * D + 2 * (l * D + l * D * D + D * D) + 3 * C * H + H * D * C
    biases = H * D + 6 * KV * D + 2 * (D + D) + 3 * H + C
    assert sum(p.numel() for p in m.parameters()) == weights + bias * biases


def test_gradients_reach_every_parameter():
    m = build(SPECS["strided"], "rope", bias=True).train()
    x = torch.randn(2, 16, 32, requires_grad=True)
    run(m, x).square().sum().backward()
    for name, p in [("input", x), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
def test_batched_prompts_of_different_lengths_decode_like_each_alone(pos_emb):
    """Left-padded rows are realigned to their first real token, so a row decodes as it would alone, and the cache
    equals recomputing each context."""
    spec = dict(attn="nsa", n_head=4, n_kv_heads=2, **SPECS["strided"])
    model = build_model(make_config(spec, pos_emb=pos_emb, block_size=16)).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [42]]
    batched_logits, recomputed_logits = [], []
    batched = generate(model, prompts, 12, temperature=0, on_step=lambda logits, new: batched_logits.append(logits))
    recomputed = generate(model, prompts, 12, temperature=0, use_cache=False,
                          on_step=lambda logits, new: recomputed_logits.append(logits))
    assert batched == recomputed
    for a, b in zip(batched_logits, recomputed_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for row, prompt in enumerate(prompts):
        assert generate(model, [prompt], 12, temperature=0)[0] == batched[row]


def test_cache_bytes_per_token():
    model = build_model(make_config(dict(attn="nsa", n_head=4, n_kv_heads=2), n_embd=32, n_layer=3))
    assert model.cache_bytes_per_token() == 3 * 6 * 2 * 8 * 4  # layers x six keys/values x KV heads x D x fp32


@pytest.mark.parametrize("flags,message", [
    (["--compress_block_size", "0"], "attn=nsa needs compress_block_size >= 1, got 0; set --compress_block_size"),
    (["--selection_block_size", "-2"], "attn=nsa needs selection_block_size >= 1, got -2"),
    (["--sliding_window_size", "0"], "attn=nsa needs sliding_window_size >= 1, got 0"),
    (["--compress_stride", "5"], r"compress_stride=5 must be in \[1, compress_block_size=4\]"),
    (["--compress_stride", "0"], r"compress_stride=0 must be in \[1, compress_block_size=4\]"),
    (["--num_selected_blocks", "1"], "num_selected_blocks=1 must be >= 2"),
    (["--n_kv_heads", "3"], "n_kv_heads=3 does not divide n_head=4"),
    (["--pos_emb", "rope", "--n_embd", "96", "--n_head", "32"], "even head size"),
])
def test_bad_config_is_one_line_error(flags, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse(["--attn", "nsa", *flags])
    assert "\n" not in str(error.value)


def test_defaults_are_the_reference_config():
    block = BlockConfig()
    assert (block.compress_block_size, block.compress_stride, block.selection_block_size, block.num_selected_blocks,
            block.sliding_window_size) == (4, None, 4, 4, 32)
    model, _ = parse(["--attn", "nsa", "--n_kv_heads", "2", "--compress_stride", "2"])
    assert (model.layers[0].attn, model.layers[0].compress_stride) == ("nsa", 2)
