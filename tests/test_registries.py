"""The layer registries are open: kinds defined outside the package train through train.py's entry point, and every
registered kind's example specs pass the generic model checks (shapes, gradients, causality, cache)."""
import json

import pytest
import torch
from torch import nn

import train as train_entry
from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import BlockConfig, ConfigError, LLMconfig, require
from llm.model import build_model
from llm.model.cache import TokenCache
from llm.model.kinds import FeedForward, FFNKind, FFNOutput, MixerKind
from llm.model.registry import FFNS, MIXERS, register_ffn, register_mixer
from tests.conftest import make_config


class ShiftCache(TokenCache):
    """The toy mixer's cache: each token's input, (B, max_len, C)."""

    def __init__(self, batch: int, max_len: int, width: int, dtype: torch.dtype, device: torch.device):
        super().__init__(batch, max_len, [(width,)], dtype, device)


class ShiftMixer(nn.Module):
    """A toy sequence mixer: each token mixes its own input with the previous token's, y_t = W [x_t | x_{t-1}]."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> ShiftCache:
        return ShiftCache(batch, max_len, self.proj.out_features, dtype, device)

    def forward(self, x, positions, mask=None, cache=None):
        T = x.size(1)
        seen = x if cache is None else cache.append(x)[0]  # (B, S, C)
        previous = torch.cat((torch.zeros_like(seen[:, :1]), seen[:, :-1]), dim=1)[:, -T:]  # (B, T, C)
        return self.proj(torch.cat((x, previous), dim=-1))  # (B, T, C)


def check_shift(block: BlockConfig, config: LLMconfig) -> None:
    require(config.n_embd % 2 == 0, f"attn=shift needs an even n_embd, got {config.n_embd}")


class SparseMLP(FeedForward):
    """A toy feed-forward kind with an auxiliary loss (coeff * mean |h|), a statistic (active units) and a hook."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, block.up_dim)
        self.down = nn.Linear(block.up_dim, config.n_embd)
        self.coeff = block.coeff
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> FFNOutput:
        h = torch.relu(self.up(x))  # (B, T, up_dim)
        stats = {"active": (h > 0).sum(), "units": h.new_tensor(h.numel())}
        return FFNOutput(self.down(h), self.coeff * h.abs().mean(), stats)

    def after_step(self, stats: dict[str, torch.Tensor]) -> None:
        self.steps_seen += 1

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"active_fraction": (stats["active"] / stats["units"]).item()}


SHIFT = MixerKind("shift", ShiftMixer, check_shift, {"shift": dict(attn="shift")})
SPARSE = FFNKind("sparse_mlp", SparseMLP, examples={"sparse_mlp": dict(ffn="sparse_mlp", up_dim=40, coeff=0.1)},
                 summaries={"active_fraction": "active"})


@pytest.fixture
def toy_kinds():
    register_mixer(SHIFT)
    register_ffn(SPARSE)
    yield
    MIXERS.pop("shift")
    FFNS.pop("sparse_mlp")


def test_toy_kinds_train_through_the_train_py_entry_point(toy_kinds, char_data, tmp_path, capsys):
    layers = [{"attn": "shift", "n_head": 1, "ffn": "sparse_mlp", "up_dim": 64, "non_linearity": "relu", "coeff": 0.1},
              {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "ffn": "dense", "up_dim": 64, "non_linearity": "relu"}]
    train_entry.main(["--layer_configs", json.dumps(layers), "--data_dir", str(char_data.parent), "--out_dir",
                      str(tmp_path), "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
                      "--total_batch_size_str", "2*4*32", "--max_iters", "6", "--log_interval", "5",
                      "--learning_rate", "3e-3", "--warmup_steps", "2", "--save_model"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["aux_loss"] > 0
    assert 0 < rows[-1]["active_fraction/layer0"] < 1 and "active_fraction/layer1" not in rows[-1]
    assert "| active " in capsys.readouterr().out  # the kind's summary in the console line
    _, model, _ = load_trained(str(tmp_path / "run"))  # rebuilt from config.json with the registered kinds
    assert type(model.blocks[0].attn) is ShiftMixer and model.blocks[0].ffn.steps_seen.item() == 6  # once per step


def test_toy_kind_checks_and_unknown_kinds_are_one_line_errors(toy_kinds):
    with pytest.raises(ConfigError, match="attn=shift needs an even n_embd, got 33"):
        parse(["--attn", "shift", "--n_embd", "33", "--n_head", "1"])
    MIXERS.pop("shift")
    with pytest.raises(ConfigError, match="attn='shift' is not a registered kind"):
        parse(["--attn", "shift"])
    register_mixer(SHIFT)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer(MixerKind("shift", ShiftMixer))


def registered_examples() -> list:
    """Every example spec of every registered mixer that serves a causal objective (with a dense MLP) and
    feed-forward kind (with GQA)."""
    params = [pytest.param(spec, id=f"mixer-{name}") for kind in MIXERS.values() if kind.direction != "bidirectional"
              for name, spec in kind.examples.items()]
    params += [pytest.param({"attn": "gqa", "n_head": 4, "n_kv_heads": 2, **spec}, id=f"ffn-{name}")
               for kind in FFNS.values() for name, spec in kind.examples.items()]
    return params


def test_every_registered_kind_has_examples():
    assert all(kind.examples for kind in [*MIXERS.values(), *FFNS.values()])


@pytest.mark.parametrize("spec", registered_examples())
@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
def test_registered_kind_examples_are_causal_train_and_decode_like_the_full_forward(spec, pos_emb):
    torch.manual_seed(0)
    model = build_model(make_config(spec, pos_emb=pos_emb, n_embd=48, n_layer=2, block_size=16))
    idx = torch.randint(0, 97, (2, 12))
    out = model(idx, idx)
    assert out.logits is None and torch.isfinite(out.loss)  # logits only without targets or when asked for
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 97
    with torch.no_grad():
        full, after = model(idx).logits, model(changed).logits
        torch.testing.assert_close(after[:, :7], full[:, :7], rtol=0, atol=1e-6)
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits
                                                           for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def bidirectional_examples() -> list:
    """Every example spec of every registered mixer that serves only bidirectional objectives."""
    return [pytest.param(spec, id=name) for kind in MIXERS.values() if kind.direction == "bidirectional"
            for name, spec in kind.examples.items()]


@pytest.mark.parametrize("spec", bidirectional_examples())
@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
def test_bidirectional_kind_examples_train_under_mlm_and_have_no_cache(spec, pos_emb):
    """Such a kind trains under mlm (shapes, finite gradients for every parameter); it never generates, and its
    bidirectionality is checked in tests/test_genomic.py."""
    model = build_model(make_config(spec, objective="mlm", pos_emb=pos_emb, n_embd=48, n_layer=2, block_size=16))
    idx = torch.randint(0, 97, (2, 12))
    assert model(idx).logits.shape == (2, 12, 97)
    out = model(idx, idx)
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="bidirectional"):
        model.new_cache(1)

