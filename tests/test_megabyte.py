"""MegaByte (Yu et al. 2023): causality over bytes in every stack, the reduction to a plain byte-level GPT at patch
size 1, cached decoding, parameter and FLOP counts, byte data with bits per byte, exact resume and the refusals."""
import json
import math
import subprocess
import sys

import pytest
import torch

from llm.cli import parse
from llm.config import ConfigError, LLMconfig
from llm.generate import generate
from llm.model import build_model
from llm.model.kinds import attention_flops
from llm.train import train
from tests.conftest import REPO, make_config

MB = dict(arch="megabyte", vocab_size=256, block_size=24, n_embd=32, n_layer=3, n_global_layer=2, patch_size=4,
          global_byte_embd=8)
STACKS = {  # global layers, then local layers
    "attention": [dict(n_head=4), dict(n_head=4), dict(n_head=2)],
    "gqa_then_window": [dict(attn="gqa", n_head=4, n_kv_heads=2), dict(n_head=2), dict(n_head=2, window=2)],
    "mamba_then_mamba": [dict(attn="mamba", ffn="none"), dict(n_head=4), dict(attn="mamba", ffn="none")],
}


def mb_config(layers: list[dict] | None = None, **fields) -> LLMconfig:
    """A small validated MegaByte config: two global layers (width 4 x 8) and one local layer (width 32)."""
    return make_config(layers or STACKS["attention"], **{**MB, **fields})


@pytest.mark.parametrize("stack", sorted(STACKS))
@pytest.mark.parametrize("patch_size,pos_emb", [(1, "learn"), (3, "rope"), (4, "learn"), (4, "none")])
def test_each_output_reads_the_bytes_up_to_its_own_and_no_later_one(stack, patch_size, pos_emb):
    model = build_model(mb_config(STACKS[stack], patch_size=patch_size, pos_emb=pos_emb)).eval()
    x = torch.randint(0, 256, (2, 23))
    logits = model(x).logits  # (2, 23, 256)
    for t in (0, 2, 3, 4, 11, 22):
        later = x.clone()
        later[:, t + 1:] = torch.randint(0, 256, (2, 22 - t))
        assert torch.equal(model(later).logits[:, :t + 1], logits[:, :t + 1]), t
        own = x.clone()
        own[:, t] = (x[:, t] + 1) % 256
        assert not torch.allclose(model(own).logits[:, t], logits[:, t]), t  # output t reads byte t


def test_patch_size_one_without_local_layers_is_a_plain_byte_gpt_with_a_start_token():
    """P = 1, no local layer, W_GL = I, a zero local start vector and local position: output t is the global model's at patch t + 1,
    whose input is the start vector then the bytes: a GPT over [start, x_0, ..., x_{T-1}] with the same blocks."""
    T, C = 15, 32
    layers = [dict(n_head=4), dict(n_head=4)]
    mb = build_model(mb_config(layers, patch_size=1, n_layer=2, n_global_layer=2, global_byte_embd=C, block_size=T,
                               tie_embeddings=False)).eval()
    with torch.no_grad():
        mb.global_to_local.weight.copy_(torch.eye(C))
        mb.local_start.zero_()
        mb.local_pos.table.weight.zero_()
    gpt = build_model(make_config(layers, vocab_size=257, block_size=T + 1, n_embd=C, tie_embeddings=False)).eval()
    with torch.no_grad():
        gpt.tok_emb.weight[:256] = mb.global_emb.weight[:256]
        gpt.tok_emb.weight[256] = mb.global_start
        gpt.pos_emb.table.weight.copy_(mb.global_pos.table.weight)
        for ours, theirs in zip(gpt.blocks, mb.blocks):
            ours.load_state_dict(theirs.state_dict())
        gpt.ln_f.load_state_dict(mb.ln_f.state_dict())
        gpt.lm_head.weight[:256] = mb.lm_head.weight[:256]
    x = torch.randint(0, 256, (3, T))
    with_start = torch.cat((torch.full((3, 1), 256), x), dim=1)  # (3, T + 1)
    expected = gpt(with_start).logits[:, 1:, :256]  # (3, T, 256)
    torch.testing.assert_close(mb(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stack", sorted(STACKS))
@pytest.mark.parametrize("pieces", [[23], [7] + [1] * 16, [5, 3, 4, 1, 10], [1] * 23])
def test_cached_decoding_equals_the_full_forward_pass(stack, pieces):
    model = build_model(mb_config(STACKS[stack], patch_size=3, pos_emb="rope")).eval()
    x = torch.randint(0, 256, (2, sum(pieces)))
    full = model(x).logits
    cache, outputs, start = model.new_cache(2), [], 0
    for length in pieces:
        outputs.append(model(x[:, start:start + length], cache=cache).logits)
        start += length
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 23


def test_greedy_generation_with_the_cache_equals_generation_without_it():
    model = build_model(mb_config(patch_size=4)).eval()
    prompts = [[72, 101, 108], [33, 10, 65]]
    cached = generate(model, prompts, 12, temperature=0.0)
    plain = generate(model, prompts, 12, temperature=0.0, use_cache=False)
    assert cached == plain and all(len(row) == 12 for row in cached)


def test_the_loss_reaches_every_parameter():
    model = build_model(mb_config(STACKS["gqa_then_window"])).train()
    x = torch.randint(0, 256, (2, 24))
    out = model(x[:, :-1], x[:, 1:])
    assert out.loss.item() == pytest.approx(math.log(256), rel=0.05)  # initialised near the uniform guess
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def block_params(width: int, up: int) -> int:
    """An mha layer with a GELU MLP, no biases: q, k, v, o (4 W^2), the MLP (2 W up) and two LayerNorm weights."""
    return 4 * width * width + 2 * width * up + 2 * width


def test_parameter_count_adds_the_two_embeddings_the_start_vectors_and_w_gl():
    P, D, C, V, T = 4, 8, 32, 256, 24
    model = build_model(mb_config())
    G = P * D  # the global width
    expected = (V * C  # the local byte embedding, tied to the head
                + V * D + G + D * C + C  # the global byte embedding, the global start, W_GL, the local start
                + (T // P + 1) * G + P * C  # the learned position tables over patches and within a patch
                + 2 * block_params(G, 4 * G) + block_params(C, 4 * C) + C)  # the blocks and the final norm
    assert model.get_num_params() == (expected, expected)


def test_flops_count_the_global_model_once_per_patch():
    P, C, T = 4, 32, 24
    model = build_model(mb_config())
    G = P * 8
    global_blocks = 2 * block_params(G, 4 * G)
    total = model.get_num_params()[0]
    global_mixing = 2 * attention_flops(T // P + 1, 4, G // 4, G // 4)
    local_mixing = attention_flops(P, 2, C // 2, C // 2)
    expected = 6 * (total - global_blocks) + local_mixing + (6 * global_blocks + global_mixing) / P
    assert model.flops_per_token() == pytest.approx(expected, rel=1e-12)


def test_cache_bytes_hold_patches_globally_and_one_patch_locally():
    model = build_model(mb_config(STACKS["attention"]))
    per_position = 2 * 32 * 4  # K and V of width 32 (both stacks) in fp32, per position and layer
    assert model.cache_bytes(21) == 2 * per_position * (21 // 4 + 1) + per_position * 4
    assert model.cache_bytes(2) == 2 * per_position + per_position * 2
    assert model.cache_bytes_per_token() == 2 * per_position // 4


SMALL = ["--arch", "megabyte", "--n_layer", "3", "--n_global_layer", "2", "--patch_size", "4",
         "--global_byte_embd", "8", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
         "--total_batch_size_str", "2*4*32", "--dropout", "0.1", "--learning_rate", "3e-3", "--warmup_steps", "2",
         "--log_interval", "1", "--eval", "--eval_interval", "3", "--eval_iters", "2", "--max_iters", "6"]


def run(byte_data, tmp_path, name: str, *extra: str) -> list[dict]:
    argv = SMALL + ["--dataset", byte_data.name, "--data_dir", str(byte_data.parent), "--out_dir", str(tmp_path),
                    "--wandb_run_name", name, *extra]
    train(*parse(argv))
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_byte_data_reports_bits_per_byte_and_resumes_exactly(byte_data, tmp_path):
    meta = json.loads((byte_data / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["bytes_per_token"]) == ("byte", 256, 1.0)
    full = run(byte_data, tmp_path, "full", "--save_model", "--ckpt_interval", "3")
    resumed = run(byte_data, tmp_path, "second", "--resume", str(tmp_path / "full" / "checkpoints" / "step_0000003"))
    figures = ("loss", "grad_norm", "val_loss", "val_bpb")
    assert [[row.get(k) for k in figures] for row in resumed] == [[row.get(k) for k in figures] for row in full[3:]]
    evaluated = [row for row in full if "val_loss" in row]
    assert evaluated and all(row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2)) for row in evaluated)
    sampled = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "full"),
                              "--max_new_tokens", "9", "--prompt", "ROMEO:"], capture_output=True, text=True,
                             timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout.startswith("ROMEO:")


@pytest.mark.parametrize("flags,message", [
    (["--patch_size", "3"], "patch_size=3 is read only by arch=megabyte models; add --arch megabyte or drop "
                            "--patch_size"),
    (["--arch", "megabyte", "--n_global_layer", "5"], "n_global_layer=5 exceeds n_layer=4"),
    (["--arch", "megabyte", "--patch_size", "0"], "patch_size=0 must be >= 1"),
    (["--arch", "megabyte", "--objective", "mlm"], "arch=megabyte predicts each byte from the bytes before it; "
                                                   "objective=mlm is not supported"),
    (["--arch", "megabyte", "--mtp", "parallel"], "mtp=parallel is not supported by arch=megabyte"),
    (["--arch", "megabyte", "--window", "8", "--window_schedule", "linear"], "window_schedule=linear is not "
                                                                             "supported by arch=megabyte"),
])
def test_bad_megabyte_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError) as error:
        parse(flags)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_each_stack_is_checked_at_its_own_width():
    """The global model's width is patch_size * global_byte_embd: a head count that divides n_embd but not it is
    refused, naming the layer; an unset up_dim is four times the layer's own width."""
    wide = r"layer 0 \(arch=megabyte: its stage is n_embd=32 wide\): n_head=3 does not divide n_embd=32"
    with pytest.raises(ConfigError, match=wide):
        parse(["--arch", "megabyte", "--n_embd", "48", "--n_head", "3", "--global_byte_embd", "8"])
    model, _ = parse(["--arch", "megabyte", "--n_layer", "3", "--global_byte_embd", "16"])
    assert [layer.up_dim for layer in model.layers] == [256, 256, 512]


def test_ragged_prompts_speculative_decoding_and_export_are_refused():
    from llm.hf import family

    model = build_model(mb_config())
    with pytest.raises(ConfigError, match="arch=megabyte reads rows of equal length only"):
        model.new_cache(2, pad=torch.tensor([0, 2]))
    with pytest.raises(ConfigError, match="speculative decoding is not supported"):
        model.new_cache(1).truncate(0)
    with pytest.raises(ConfigError, match="cannot export: arch=megabyte"):
        family(mb_config())


def test_the_tiny_preset_prepares_the_shipped_bytes_and_trains(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--preset", "megabyte-tiny", "--max_iters", "2",
                             "--batch_size", "2", "--eval_iters", "1", "--data_dir", str(tmp_path / "data"),
                             "--out_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "was missing: prepared shakespeare_byte from the Tiny Shakespeare text shipped with llm" in result.stdout
    assert "bits per byte" in result.stdout.splitlines()[-2]  # the final validation line, then the checkpoint
    meta = json.loads((tmp_path / "data" / "shakespeare_byte" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["bytes_per_token"]) == ("byte", 256, 1.0)
