"""Every registered mixer and feed-forward kind compiles whole (`fullgraph=True`) in training mode and compiles once
for training steps of the same shapes; the training step reads nothing back from the device.

The steps are llm.train.step.train_step itself (forward, backward, clipping, AdamW or Muon, the layers' after-step
hooks), compiled with the aot_eager backend, which traces forward and backward through AOTAutograd like inductor does
but skips code generation; one test runs inductor on the default model. The optimizer step runs eagerly.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from llm.config import Trainconfig
from llm.model import LLM
from llm.model.ffn import experts
from llm.model.registry import FFNS, MIXERS
from llm.train.distributed import Distributed
from llm.train.optim import build_optimizer
from llm.train.precision import Precision
from llm.train.step import NonFiniteGuard, train_step
from tests.conftest import make_config

CPU = torch.device("cpu")
BATCH, BLOCK = 2, 16
POSITIONS = {"learn": dict(pos_emb="learn", norm="layer"), "rope": dict(pos_emb="rope", norm="rms")}
MOE = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "ffn": "moe", "n_exp": 6, "n_shared": 1, "n_act": 3, "up_dim": 32}


class FixedBatches:
    """A loader that returns the same batch of inputs and targets, (B, T) token ids each, every time."""

    def __init__(self, vocab_size: int):
        self.x = torch.randint(0, vocab_size, (BATCH, BLOCK))  # (B, T)
        self.y = torch.randint(0, vocab_size, (BATCH, BLOCK))  # (B, T)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def mixer_examples() -> list:
    """Every example spec of every registered mixer kind, with a dense MLP."""
    return [pytest.param(spec, id=name) for kind in MIXERS.values() for name, spec in kind.examples.items()]


def ffn_examples() -> list:
    """Every example spec of every registered feed-forward kind, with GQA."""
    return [pytest.param({"attn": "gqa", "n_head": 4, "n_kv_heads": 2, **spec}, id=name)
            for kind in FFNS.values() for name, spec in kind.examples.items()]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def train_compiled(spec: dict, backend: str = "aot_eager", act_recomp: bool = False,
                   dtype: torch.dtype = torch.float32, steps: int = 3, optimizer: str = "adamw",
                   **model_fields) -> None:
    """`steps` training steps of a one-layer model with `spec`, compiled whole with `backend`: fails on a graph
    break (fullgraph raises) and on a recompilation, and checks that one graph was compiled."""
    model = LLM(make_config(spec, n_embd=48, n_layer=1, block_size=BLOCK, **model_fields)).train()
    model.act_recomp = act_recomp
    cfg = Trainconfig(device="cpu", optimizer=optimizer)
    loader, optimizer, job = FixedBatches(model.config.vocab_size), build_optimizer(model, cfg, CPU), Distributed()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(steps):
            result = train_step(model, compiled, loader, 1, Precision(CPU, dtype, None), optimizer, cfg, job)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.isfinite(result.loss) and torch.isfinite(result.grad_norm)


@pytest.mark.parametrize("spec", mixer_examples())
@pytest.mark.parametrize("positions", POSITIONS)
def test_every_mixer_kind_compiles_whole_once(spec, positions):
    train_compiled(spec, **POSITIONS[positions])


@pytest.mark.parametrize("spec", ffn_examples())
def test_every_feed_forward_kind_compiles_whole_once(spec):
    train_compiled(spec, **POSITIONS["rope"])


def test_activation_recomputation_compiles_whole_once():
    train_compiled({**MOE, "router_score": "sigmoid", "aux_free": True}, act_recomp=True, **POSITIONS["rope"])


def test_moe_under_bf16_autocast_compiles_whole_once_with_grouped_mm_in_the_graph(monkeypatch):
    def refuse(*args):
        raise AssertionError("bf16 experts should run torch's grouped matmul in the graph, not the opaque operator")

    monkeypatch.setattr(experts, "opaque_grouped_mm", refuse)
    train_compiled(MOE, dtype=torch.bfloat16)


def test_moe_padded_fallback_compiles_whole_once(monkeypatch):
    monkeypatch.setattr(experts, "GROUPED_MM", None)
    train_compiled(MOE)


def test_muon_steps_compile_the_model_whole_once():
    """The model compiles as with AdamW; Muon's step runs eagerly after it, as AdamW's does."""
    train_compiled(MOE, optimizer="muon", **POSITIONS["learn"])


def test_default_model_compiles_whole_once_with_inductor():
    train_compiled({}, backend="inductor", steps=2)


HOST_READS = ["item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("spec", mixer_examples() + ffn_examples())
def test_training_step_reads_nothing_back_from_the_device(spec, optimizer, monkeypatch, tmp_path):
    """train_step with gradient accumulation and the non-finite guard's record, as the loop runs them on steps that
    are not logged, never reads a tensor's value on the host (on CUDA each read would wait for the device)."""
    model = LLM(make_config(spec, n_embd=48, n_layer=1, block_size=BLOCK)).train()
    cfg = Trainconfig(device="cpu", optimizer=optimizer)
    loader, optimizer, job = FixedBatches(model.config.vocab_size), build_optimizer(model, cfg, CPU), Distributed()
    guard = NonFiniteGuard(CPU, tmp_path)

    def refuse(self, *args, **kwargs):
        raise AssertionError("the training step read a tensor on the host")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for step, accum_steps in enumerate((1, 2)):
        result = train_step(model, model, loader, accum_steps, Precision(CPU, torch.float32, None), optimizer, cfg, job)
        guard.record(step, result.loss)
