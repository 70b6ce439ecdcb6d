"""H-Net (Hwang, Wang, Gu 2025): routing, chunking, smoothing and the ratio loss against explicit loops, the reduction
to a flat stack when every position begins a chunk, causality and cached decoding in one and two stages, counts,
exact resume on bytes and the refusals."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llm.cli import parse
from llm.config import ConfigError, LLMconfig
from llm.model import build_model
from llm.model.arch.hnet import P_MAX, P_MIN, Routing, StraightThrough, chunk, layer_stages, ratio_loss, smooth
from llm.train import train
from tests.conftest import make_config

ONE_STAGE = dict(hnet_encoder_layers=[1], hnet_decoder_layers=[1], hnet_ratios=[2.0])
TWO_STAGES = dict(hnet_encoder_layers=[1, 1], hnet_decoder_layers=[1, 1], hnet_widths=[32, 48],
                  hnet_ratios=[2.0, 1.5])
STACKS = ("attention", "mamba_outside")  # attention throughout, or the outer stage's layers Mamba (the paper's)


def hnet_config(stages: dict, n_layer: int, stack: str = "attention", **fields) -> LLMconfig:
    """A small validated H-Net config over bytes; n_layer - (encoders + decoders) layers form the main network."""
    base = dict(arch="hnet", vocab_size=256, block_size=40, n_embd=32, pos_emb="rope", n_layer=n_layer, **stages,
                **fields)
    mamba = dict(attn="mamba", ffn="none")
    layers = [mamba if stack == "mamba_outside" and stage == 0 else dict(n_head=2)
              for stage in layer_stages(LLMconfig(**base))]
    return make_config(layers, **base)


def random_routing(model) -> None:
    """Routing projections away from the identity, so that chunks of several lengths form, and residual projections
    away from zero (at zero, a position that begins no chunk reads its own byte only through the routing's
    straight-through factor, which is 1)."""
    for routing, residual in zip(model.routings, model.residuals):
        torch.nn.init.normal_(routing.q.weight, std=0.3)
        torch.nn.init.normal_(routing.k.weight, std=0.3)
        torch.nn.init.normal_(residual.weight, std=0.1)


def test_routing_at_identity_is_the_cosine_of_adjacent_states():
    routing = Routing(6)
    routing.start_at_identity()
    h = torch.randn(2, 5, 6)
    expected = torch.ones(2, 5)
    for b in range(2):
        for t in range(1, 5):
            expected[b, t] = (1 - F.cosine_similarity(h[b, t - 1], h[b, t], dim=0)) / 2
    torch.testing.assert_close(routing(h), expected)
    torch.testing.assert_close(routing(h[:, 2:], previous=h[:, 1]), expected[:, 2:])  # continuing a sequence


def test_chunking_keeps_the_chunk_starts_in_order_padded_after():
    h = torch.randn(3, 7, 4)
    boundary = torch.rand(3, 7) > 0.5
    boundary[:, 0] = True
    chunks, real, order = chunk(h, boundary)
    M = int(boundary.sum(1).max())
    assert chunks.shape == (3, M, 4)
    for b in range(3):
        kept = h[b][boundary[b]]
        n = len(kept)
        assert torch.equal(chunks[b, :n], kept) and not chunks[b, n:].any()
        assert real[b].tolist() == [True] * n + [False] * (M - n)
        assert order[b, :n].tolist() == boundary[b].nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("with_start", [False, True])
def test_smoothing_equals_the_ema_loop_spread_over_the_positions(with_start):
    B, L, C = 2, 9, 3
    boundary = torch.rand(B, L) > 0.4
    boundary[:, 0] = not with_start  # with a start state the first positions may come before any chunk
    M = int(boundary.sum(1).max())
    z, p = torch.randn(B, M, C, dtype=torch.float64), torch.rand(B, M, dtype=torch.float64)
    start = torch.randn(B, C, dtype=torch.float64) if with_start else None
    out = smooth(z, p, boundary, start)
    for b in range(B):
        zbar = torch.zeros(C, dtype=torch.float64) if start is None else start[b]
        k = 0
        for t in range(L):
            if boundary[b, t]:
                P = p[b, k].clamp(P_MIN, P_MAX)
                zbar = P * z[b, k] + (1 - P) * zbar
                k += 1
            torch.testing.assert_close(out[b, t], zbar, rtol=1e-12, atol=1e-12)


def test_ratio_loss_is_its_formula_and_one_at_the_target():
    N = 4.0
    boundary = torch.tensor([[True, False, False, False, True, False, False, False]])
    p = torch.full((1, 8), 0.25, requires_grad=True)  # F = G = 1/N
    assert ratio_loss(boundary, p, None, N).item() == pytest.approx(1.0, abs=1e-7)
    p2 = torch.rand(1, 8, requires_grad=True)
    real = torch.tensor([[True] * 6 + [False] * 2])
    f, g = 2 / 6, p2[0, :6].mean()
    expected = N / (N - 1) * ((N - 1) * f * g + (1 - f) * (1 - g))
    loss = ratio_loss(boundary, p2, real, N)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert not p2.grad[0, 6:].any() and p2.grad[0, :6].abs().sum() > 0  # through G, over the real positions


def test_straight_through_is_one_forward_and_the_identity_backward():
    x = torch.rand(5, requires_grad=True)
    y = StraightThrough.apply(x)
    assert torch.equal(y, torch.ones(5))
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0))


def test_every_position_a_chunk_reduces_to_the_flat_stack(monkeypatch):
    """With p = 1 everywhere every position begins a chunk: the stage is encoder, main network and decoder in a
    row (the smoothing keeps 1 - 1e-4 of each new value, the residual projection starts at zero)."""
    model = build_model(hnet_config(ONE_STAGE, 4, hnet_widths=[48])).eval()
    monkeypatch.setattr(Routing, "forward", lambda self, h, previous=None: torch.ones(h.shape[:2]))
    x = torch.randint(0, 256, (2, 17))
    positions = torch.arange(17)[None]
    h = model.tok_emb(x)
    h = model.encoder_norms[0](model.blocks[0](h, positions)[0])
    z = torch.cat((h, model.widenings["0"].expand(2, 17, -1)), dim=-1)
    for i in (1, 2):
        z = model.blocks[i](z, positions)[0]
    y = model.main_norm(z)[..., :32] + model.residuals[0](h)
    y = model.blocks[3](y, positions)[0]
    flat = model.lm_head(model.ln_f(y))[..., :256]
    torch.testing.assert_close(model(x).logits, flat, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stages", [ONE_STAGE, TWO_STAGES], ids=["one_stage", "two_stages"])
@pytest.mark.parametrize("stack", STACKS)
def test_each_output_reads_the_bytes_up_to_its_own_and_no_later_one(stages, stack):
    model = build_model(hnet_config(stages, 6, stack)).eval()
    random_routing(model)
    x = torch.randint(0, 256, (2, 31))
    logits = model(x).logits
    for t in (0, 1, 7, 18, 30):
        later = x.clone()
        later[:, t + 1:] = torch.randint(0, 256, (2, 30 - t))
        assert torch.equal(model(later).logits[:, :t + 1], logits[:, :t + 1]), t
        own = x.clone()
        own[:, t] = (x[:, t] + 1) % 256
        assert not torch.allclose(model(own).logits[:, t], logits[:, t]), t


@pytest.mark.parametrize("stages", [ONE_STAGE, TWO_STAGES], ids=["one_stage", "two_stages"])
@pytest.mark.parametrize("pieces", [[31], [6] + [1] * 25, [4, 9, 1, 17]])
def test_cached_decoding_equals_the_full_forward_pass(stages, pieces):
    model = build_model(hnet_config(stages, 6, "mamba_outside")).eval()
    random_routing(model)
    x = torch.randint(0, 256, (3, sum(pieces)))
    full = model(x).logits
    cache, outputs, start = model.new_cache(3), [], 0
    for length in pieces:
        outputs.append(model(x[:, start:start + length], cache=cache).logits)
        start += length
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-4, atol=1e-4)


def test_the_loss_reaches_every_parameter():
    model = build_model(hnet_config(TWO_STAGES, 6)).train()
    random_routing(model)
    x = torch.randint(0, 256, (2, 33))
    out = model(x[:, :-1], x[:, 1:])
    (out.loss + out.aux_loss).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert set(out.stats) == {"hnet/compression0", "hnet/compression1"}
    assert all(v >= 1 for v in out.stats.values())


def test_the_auxiliary_loss_is_the_weighted_ratio_loss_and_the_compression_its_chunks():
    model = build_model(hnet_config(ONE_STAGE, 3, ratio_loss_weight=0.05)).eval()
    random_routing(model)
    x = torch.randint(0, 256, (2, 29))
    out = model(x[:, :-1], x[:, 1:])
    h = model.encoder_norms[0](model.blocks[0](model.tok_emb(x[:, :-1]), torch.arange(28)[None])[0])
    p = model.routings[0](h)
    torch.testing.assert_close(out.aux_loss, 0.05 * ratio_loss(p > 0.5, p, None, 2.0))
    assert out.stats["hnet/compression0"].item() == pytest.approx(2 * 28 / (p > 0.5).sum().item())


def block_params(width: int) -> int:
    """An mha layer with a GELU MLP of 4 x width, no biases, two LayerNorm weights."""
    return 12 * width * width + 2 * width


def test_parameter_count_and_flops_at_the_target_ratios():
    model = build_model(hnet_config(TWO_STAGES, 6))
    widths = [32, 32, 48]
    blocks = 2 * block_params(32) + 2 * block_params(32) + 2 * block_params(48)  # outer, inner, main
    routing = sum(2 * w * w + w * w for w in widths[:2])  # W_q, W_k and the residual projection per stage
    norms = 32 + 32 + 32 + 48 + 32  # encoder norms, the inner decoder's, the main network's, ln_f
    expected = 256 * 32 + blocks + routing + norms + (48 - 32)  # tied embedding, ..., the widening vector
    assert model.get_num_params() == (expected, expected)
    reach = [1, 1 / 2, 1 / 3]  # N = 2 then 1.5
    per_layer = [(block_params(w), model.blocks[i].mixing_flops(), reach[s])
                 for i, (w, s) in enumerate([(32, 0), (32, 1), (48, 2), (48, 2), (32, 1), (32, 0)])]
    once = 6 * (expected - sum(n for n, _, _ in per_layer))
    assert model.flops_per_token() == pytest.approx(once + sum(f * (6 * n + m) for n, m, f in per_layer))


SMALL = ["--arch", "hnet", "--n_layer", "4", "--hnet_encoder_layers", "1", "--hnet_decoder_layers", "1",
         "--hnet_ratios", "3", "--n_embd", "32", "--n_head", "2", "--pos_emb", "rope", "--block_size", "48",
         "--batch_size", "4", "--total_batch_size_str", "2*4*48", "--dropout", "0.1", "--learning_rate", "3e-3",
         "--warmup_steps", "2", "--log_interval", "1", "--eval", "--eval_interval", "3", "--eval_iters", "2",
         "--max_iters", "6"]


def run(byte_data, tmp_path, name: str, *extra: str) -> list[dict]:
    argv = SMALL + ["--dataset", byte_data.name, "--data_dir", str(byte_data.parent), "--out_dir", str(tmp_path),
                    "--wandb_run_name", name, *extra]
    train(*parse(argv))
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_training_on_bytes_logs_the_compression_and_resumes_exactly(byte_data, tmp_path):
    full = run(byte_data, tmp_path, "full", "--save_model", "--ckpt_interval", "3")
    resumed = run(byte_data, tmp_path, "second", "--resume", str(tmp_path / "full" / "checkpoints" / "step_0000003"))
    figures = ("loss", "grad_norm", "hnet/compression0", "val_loss", "val_bpb")
    assert [[row.get(k) for k in figures] for row in resumed] == [[row.get(k) for k in figures] for row in full[3:]]
    assert all(row["hnet/compression0"] >= 1 for row in full)
    evaluated = [row for row in full if "val_loss" in row]
    assert evaluated and all(row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2)) for row in evaluated)


@pytest.mark.parametrize("flags,message", [
    (["--hnet_ratios", "3"], "hnet_ratios=[3.0] is read only by arch=hnet models; add --arch hnet or drop "
                             "--hnet_ratios"),
    (["--arch", "hnet", "--hnet_encoder_layers", "2", "2"], "hnet_decoder_layers=[2] needs one entry per stage"),
    (["--arch", "hnet", "--n_layer", "4"], "arch=hnet: n_layer=4 leaves 0 layers for the main network"),
    (["--arch", "hnet", "--n_layer", "5", "--hnet_ratios", "1"], "hnet_ratios=[1.0] must be > 1 each"),
    (["--arch", "hnet", "--n_layer", "5", "--hnet_widths", "64", "--n_embd", "128"],
     "hnet_widths=[64] must not narrow inward from n_embd=128"),
    (["--arch", "hnet", "--n_layer", "5", "--objective", "mdlm"], "arch=hnet predicts each byte from the bytes "
                                                                  "before it; objective=mdlm is not supported"),
])
def test_bad_hnet_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError) as error:
        parse(flags)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_ragged_prompts_speculative_decoding_and_export_are_refused():
    from llm.hf import family

    model = build_model(hnet_config(ONE_STAGE, 3))
    with pytest.raises(ConfigError, match="arch=hnet reads rows of equal length only"):
        model.new_cache(2, pad=torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match="speculative decoding is not supported"):
        model.new_cache(1).truncate(0)
    with pytest.raises(ConfigError, match="cannot export: arch=hnet"):
        family(hnet_config(ONE_STAGE, 3))
