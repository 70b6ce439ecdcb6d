"""The normalized transformer (--arch ngpt): the forward pass against a direct transcription of the paper's equations,
unit norms of hidden states and weights after training steps and loads, causality, the cache, gradients, parameter
counts, exact resume, the preset and the refusals."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import ConfigError, Trainconfig
from llm.model import LLM, build_model
from llm.model.llm import padded_vocab_size
from llm.precision import Precision
from llm.train import train
from llm.train.distributed import Distributed
from llm.train.optim import build_optimizer
from llm.train.step import train_step
from tests.conftest import make_config

CPU = torch.device("cpu")
NGPT = dict(arch="ngpt", pos_emb="rope", tie_embeddings=False)
GQA = dict(attn="gqa", n_head=4, n_kv_heads=2, non_linearity="swiglu", up_dim=40)
SPECS = {"gqa_swiglu": GQA, "mha_geglu": dict(attn="mha", n_head=4, non_linearity="geglu", up_dim=40),
         "mqa_swiglu": dict(attn="mqa", n_head=2, non_linearity="swiglu", up_dim=24),
         "gqa_wide_heads": dict(GQA, head_dim=20)}
ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu}
# The dimension along the model width of each matrix, by the end of its name: its vectors have unit norm over it.
SPHERE_DIMS = {"tok_emb.weight": 1, "lm_head.weight": 1, "attn.c_attn.weight": 1, "attn.c_proj.weight": 0,
               "ffn.c_fc.weight": 1, "ffn.c_proj.weight": 0}


def ngpt_model(spec: dict = GQA, **fields) -> LLM:
    """A small nGPT model with its learned scalings moved away from their initial values (so that each one matters
    in the comparisons)."""
    model = build_model(make_config(spec, **{**NGPT, **fields}))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    return model


def norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """x (hs,) rotated by RoPE at `position`: component i pairs with i + hs/2 at angle position / theta^(2i/hs)."""
    half = x.numel() // 2
    angle = position / theta ** (torch.arange(half, dtype=x.dtype) * 2 / x.numel())
    a, b = x[:half], x[half:]
    return torch.cat((a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()))


def reference(model: LLM, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits (T, vocab_size) of one sequence idx (T,) and the hidden state after each block, from the paper's
    equations, token by token and head by head in float64: h = E_in[token]; per block q, k, v = W_q h, W_k h,
    W_v h; q_i, k_i = s_qk,i Norm(RoPE(q_i)), s_qk,i Norm(RoPE(k_i)) per head i (a grouped head's key with its query
    head's s_qk); softmax(sqrt(d_k) q_i . k_i) causal; h_A = Norm(W_o y); h = Norm(h + alpha_A (h_A - h));
    u = s_u W_u h, nu = s_nu W_nu h sqrt(d_model); h_M = Norm(W_o' (u act(nu))); h = Norm(h + alpha_M (h_M - h));
    z = s_z E_out h. Each scaling s is its stored value times init / scale."""
    c = model.config
    d, T = c.n_embd, idx.numel()
    p = {name: param.detach().double() for name, param in model.named_parameters()}
    h = [p["tok_emb.weight"][t] for t in idx.tolist()]
    hidden = []
    for i, layer in enumerate(c.layers):
        b = f"blocks.{i}."
        H, hs = layer.n_head, layer.head_dim or d // layer.n_head
        KV = {"mha": H, "mqa": 1, "gqa": layer.n_kv_heads}[layer.attn]
        W_q, W_k, W_v = p[b + "attn.c_attn.weight"].split([H * hs, KV * hs, KV * hs])
        s_qk = p[b + "attn.s_qk.value"] * (1.0 / (1 / math.sqrt(d)))
        alpha_scale = c.ngpt_alpha_scale or 1 / math.sqrt(d)
        alpha_A = p[b + "alpha_attn.value"] * (c.ngpt_alpha_attn_init / alpha_scale)
        alpha_M = p[b + "alpha_mlp.value"] * (c.ngpt_alpha_mlp_init / alpha_scale)
        new_h = []
        for t in range(T):
            heads = []
            for head in range(H):
                kv = head // (H // KV)
                rows, kv_rows = slice(head * hs, (head + 1) * hs), slice(kv * hs, (kv + 1) * hs)
                q = s_qk[rows] * norm(rope(W_q[rows] @ h[t], t, c.rope_theta))
                keys = [s_qk[rows] * norm(rope(W_k[kv_rows] @ h[s], s, c.rope_theta)) for s in range(t + 1)]
                weights = torch.softmax(torch.stack([math.sqrt(hs) * (q @ k) for k in keys]), dim=0)
                heads.append(sum(w * (W_v[kv_rows] @ h[s]) for s, w in enumerate(weights)))
            h_A = norm(p[b + "attn.c_proj.weight"] @ torch.cat(heads))
            new_h.append(norm(h[t] + alpha_A * (h_A - h[t])))
        h = new_h
        W_nu, W_u = p[b + "ffn.c_fc.weight"].chunk(2)
        act = ACTIVATIONS[layer.non_linearity]
        for t in range(T):
            u = p[b + "ffn.s_u.value"] * (W_u @ h[t])
            nu = p[b + "ffn.s_nu.value"] * (W_nu @ h[t]) * math.sqrt(d)
            h_M = norm(p[b + "ffn.c_proj.weight"] @ (u * act(nu)))
            h[t] = norm(h[t] + alpha_M * (h_M - h[t]))
        hidden.append(torch.stack(h))
    s_z = p["logit_scale.s_z.value"] * (1.0 / (1 / math.sqrt(d)))
    logits = torch.stack([s_z * (p["lm_head.weight"] @ h_t) for h_t in h])
    return logits[:, :c.vocab_size], hidden


def block_outputs(model: LLM, idx: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state (B, T, C) after each block of the model's own forward pass."""
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out[0])) for block in model.blocks]
    model(idx)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_forward_equals_the_papers_equations(spec):
    model = ngpt_model(spec, ngpt_alpha_attn_init=0.3, ngpt_alpha_mlp_init=0.2, ngpt_alpha_scale=0.5).eval()
    idx = torch.randint(0, 97, (2, 7))
    logits = model(idx).logits
    hidden = block_outputs(model, idx)
    for row in range(2):
        expected, expected_hidden = reference(model, idx[row])
        torch.testing.assert_close(logits[row].double(), expected, atol=1e-5, rtol=0)
        for ours, theirs in zip(hidden, expected_hidden):
            torch.testing.assert_close(ours[row].double(), theirs, atol=1e-5, rtol=0)


def test_hidden_states_and_embeddings_have_unit_norm():
    model = ngpt_model()
    idx = torch.randint(0, 97, (3, 20))
    outputs = block_outputs(model, idx)
    assert len(outputs) == model.config.n_layer
    for h in [model.tok_emb(idx), *outputs]:
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(3, 20), atol=1e-5, rtol=0)


def assert_on_sphere(model: LLM) -> None:
    """Every matrix of the model has unit vectors along the dimension SPHERE_DIMS gives for its name."""
    matrices = {name: param for name, param in model.named_parameters() if param.dim() == 2}
    assert len(matrices) == 1 + (not model.config.tie_embeddings) + 4 * model.config.n_layer  # a tied head: once
    for name, param in matrices.items():
        (dim,) = [dim for end, dim in SPHERE_DIMS.items() if name.endswith(end)]
        norms = param.norm(dim=dim)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0, msg=name)


class FixedBatches:
    """A loader that returns the same random batch every time."""

    batching = None  # the plain next-token rows: no extra parts

    def __init__(self, vocab_size: int, batch: int = 2, block: int = 16):
        self.x = torch.randint(0, vocab_size, (batch, block))  # (B, T)
        self.y = torch.randint(0, vocab_size, (batch, block))  # (B, T)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


@pytest.mark.parametrize("tied", [False, True])
def test_weights_are_back_on_the_sphere_after_every_optimizer_step(tied):
    model = ngpt_model(tie_embeddings=tied).train()
    cfg = Trainconfig(device="cpu", weight_decay=0.0, learning_rate=0.05)
    optimizer, loader = build_optimizer(model, cfg, CPU), FixedBatches(97)
    assert_on_sphere(model)  # at initialisation
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    model(*loader.next_batch()).loss.backward()
    optimizer.step()  # without the hook the step leaves the sphere
    assert (model.tok_emb.weight.norm(dim=1) - 1).abs().max() > 1e-3
    optimizer.zero_grad()
    losses = [train_step(model, model, loader, 1, Precision(CPU, torch.float32, None), optimizer, cfg,
                         Distributed()).loss for _ in range(3)]
    assert_on_sphere(model)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(param, before[name]) for name, param in model.named_parameters())


def test_weights_are_renormalised_when_loaded():
    model = ngpt_model()
    state = {name: t * 3 if t.dim() == 2 else t for name, t in model.state_dict().items()}
    model.load_state_dict(state)
    assert_on_sphere(model)


def test_causal():
    model = ngpt_model().eval()
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 6] = (idx[:, 6] + 1) % 97
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_masked_lm_objective_is_bidirectional():
    model = ngpt_model(objective="mlm").eval()
    idx = torch.randint(0, 97, (1, 10))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 97
    assert not torch.allclose(model(idx).logits[:, 0], model(changed).logits[:, 0])


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_cached_decoding_equals_the_full_forward(spec):
    model = ngpt_model(spec).eval()
    idx = torch.randint(0, 97, (2, 11))
    full = model(idx).logits
    cache = model.new_cache(2)
    steps = [model(idx[:, :5], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits
                                                       for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_cached_decoding_equals_each_rows_forward():
    model = ngpt_model().eval()
    short, long = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1), long))  # (2, 9)
    cache = model.new_cache(2, pad=torch.tensor([3, 0]))
    prefill = model(batch[:, :7], cache=cache).logits
    step = model(batch[:, 7:], cache=cache).logits
    logits = torch.cat((prefill, step), dim=1)  # (2, 9, V)
    torch.testing.assert_close(logits[0, 3:], model(short).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], model(long).logits[0], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter():
    model = ngpt_model().train()
    idx = torch.randint(0, 97, (2, 12))
    model(idx, idx).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_parameter_count(spec, tied):
    config = make_config(spec, **{**NGPT, "tie_embeddings": tied})
    d, V, L, U = config.n_embd, padded_vocab_size(config.vocab_size), config.n_layer, spec["up_dim"]
    H = spec["n_head"]
    KV = {"mha": H, "mqa": 1, "gqa": spec.get("n_kv_heads")}[spec["attn"]]
    hs = spec.get("head_dim", d // H)
    attention = d * (H + 2 * KV) * hs + H * hs * d + H * hs  # W_q, W_k, W_v, W_o, s_qk
    mlp = d * 2 * U + U * d + 2 * U  # W_u and W_nu, W_o, s_u and s_nu
    per_layer = attention + mlp + 2 * d  # alpha_A, alpha_M
    expected = V * d * (1 if tied else 2) + V + L * per_layer  # embeddings (and head), s_z
    assert build_model(config).get_num_params() == (expected, expected)


def test_scalings_start_at_their_scale_and_act_at_their_init():
    model = build_model(make_config(GQA, **NGPT, ngpt_alpha_attn_init=0.1, ngpt_alpha_mlp_init=0.2))
    d = model.config.n_embd
    block = model.blocks[0]
    cases = [(block.alpha_attn, 1 / math.sqrt(d), 0.1), (block.alpha_mlp, 1 / math.sqrt(d), 0.2),
             (block.attn.s_qk, 1 / math.sqrt(d), 1.0), (block.ffn.s_u, 1.0, 1.0), (block.ffn.s_nu, 1.0, 1.0),
             (model.logit_scale.s_z, 1 / math.sqrt(d), 1.0)]
    for scaling, scale, init in cases:
        torch.testing.assert_close(scaling.value, torch.full_like(scaling.value, scale))
        torch.testing.assert_close(scaling(), torch.full_like(scaling.value, init))
    other = build_model(make_config(GQA, **NGPT, ngpt_alpha_scale=0.25)).blocks[0].alpha_attn
    torch.testing.assert_close(other.value, torch.full_like(other.value, 0.25))
    torch.testing.assert_close(other(), torch.full_like(other.value, 0.05))


def test_preset_sets_the_recommended_flags():
    model, run = parse(["--preset", "ngpt"])
    assert (model.arch, model.pos_emb, model.tie_embeddings) == ("ngpt", "rope", False)
    assert model.layers[0].non_linearity == "swiglu"
    assert (run.weight_decay, run.warmup_steps) == (0.0, 0)


NGPT_FLAGS = ["--preset", "ngpt"]
REFUSALS = [
    (["--arch", "ngpt", "--pos_emb", "rope", "--non_linearity", "swiglu"], "weight_decay=0.1 must be 0"),
    (NGPT_FLAGS + ["--pos_emb", "learn"], "pos_emb=learn; use --pos_emb rope"),
    (NGPT_FLAGS + ["--non_linearity", "gelu"], "non_linearity=gelu; use --non_linearity swiglu"),
    (NGPT_FLAGS + ["--attn", "mla", "--kv_latent_dim", "16", "--rope_head_dim", "8"],
     "arch=ngpt normalises mha/mqa/gqa attention, not attn=mla"),
    (NGPT_FLAGS + ["--attn", "nsa"], "not attn=nsa"),
    (NGPT_FLAGS + ["--moe"], "not ffn=moe"),
    (NGPT_FLAGS + ["--ffn", "peer"], "not ffn=peer"),
    (NGPT_FLAGS + ["--window", "8"], "sliding window (window=8)"),
    (NGPT_FLAGS + ["--mod"], "mod=true (mixture-of-depths) is not supported"),
    (NGPT_FLAGS + ["--mtp", "sequential"], "mtp=sequential is not supported"),
    (NGPT_FLAGS + ["--arch", "ngpt", "--recurrent_depth", "--n_prelude", "1", "--n_core", "2", "--n_coda", "1"],
     "--arch ngpt contradicts --recurrent_depth"),
    (NGPT_FLAGS + ["--bias"], "has no biases"),
    (NGPT_FLAGS + ["--dropout", "0.1"], "dropout=0.1; set --dropout 0"),
    (NGPT_FLAGS + ["--norm", "rms"], "norm=rms would be ignored"),
    (NGPT_FLAGS + ["--emb_init_std", "1.0"], "emb_init_std=1.0 would be ignored"),
    (NGPT_FLAGS + ["--weight_decay", "0.01"], "weight_decay=0.01 must be 0"),
    (NGPT_FLAGS + ["--dist", "fsdp"], "use --dist ddp"),
    (NGPT_FLAGS + ["--ngpt_alpha_scale", "0"], "ngpt_alpha_scale=0.0 must be > 0"),
    (NGPT_FLAGS + ["--ngpt_alpha_attn_init", "-0.1"], "ngpt_alpha_attn_init=-0.1 must be > 0"),
    (["--ngpt_alpha_mlp_init", "0.1"], "ngpt_alpha_mlp_init=0.1 is read only by arch=ngpt models; add --arch ngpt"),
]


@pytest.mark.parametrize("argv,message", REFUSALS, ids=[r[1][:40] for r in REFUSALS])
def test_refusals_are_one_line(argv, message):
    with pytest.raises(ConfigError) as error:
        parse(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_export_to_transformers_is_refused():
    from llm.hf import family

    with pytest.raises(ConfigError, match=r"^cannot export: arch=ngpt \(the normalized transformer\)"):
        family(make_config(GQA, **NGPT))


SMALL = ["--preset", "ngpt", "--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "32",
         "--batch_size", "4", "--total_batch_size_str", "2*4*32", "--up_dim", "48", "--learning_rate", "1e-2",
         "--log_interval", "1", "--eval", "--eval_interval", "3", "--eval_iters", "2", "--max_iters", "6",
         "--device", "cpu"]


def run(char_data, tmp_path, name: str, *extra: str) -> dict[int, tuple]:
    argv = SMALL + ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--wandb_run_name", name, *extra]
    train(*parse(argv))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: (m["loss"], m["grad_norm"], m.get("val_loss")) for m in rows}


def test_training_resumes_exactly_and_renormalises_loaded_weights(char_data, tmp_path):
    full = run(char_data, tmp_path, "full", "--save_model", "--ckpt_interval", "3")
    assert full[5][0] < full[0][0]
    checkpoint = tmp_path / "full" / "checkpoints" / "step_0000003"
    resumed = run(char_data, tmp_path, "second", "--resume", str(checkpoint))
    assert sorted(resumed) == [3, 4, 5] and all(resumed[step] == full[step] for step in resumed), (resumed, full)
    _, model, _ = load_trained(str(checkpoint))
    assert_on_sphere(model)
    (file,) = checkpoint.glob("*.safetensors")
    weights = load_file(str(file))
    save_file({name: t * 4 if t.dim() == 2 else t for name, t in weights.items()}, str(file))  # off the sphere
    (checkpoint / "weights.sha256").unlink()  # weights written by other code, with no checksum beside them
    _, model, _ = load_trained(str(checkpoint))
    assert_on_sphere(model)
    rescaled = run(char_data, tmp_path, "third", "--resume", str(checkpoint))  # renormalised: up to rounding
    for step in rescaled:
        assert rescaled[step][:2] == pytest.approx(full[step][:2], rel=1e-5), (step, rescaled, full)


def test_two_ddp_ranks_equal_one_process(char_data, tmp_path):
    from tests.test_distributed import assert_same_trajectory, single, torchrun

    flags = ["--preset", "ngpt", "--up_dim", "48"]
    reference = single(char_data, tmp_path, "one", *flags)
    two = torchrun(char_data, tmp_path, "two", "--dist", "ddp", *flags)
    assert sorted(two) == list(range(6))
    assert_same_trajectory(reference, two, range(6))
