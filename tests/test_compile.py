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
from llm.model import build_model
from llm.model.ffn import experts
from llm.model.registry import FFNS, MIXERS
from llm.precision import Precision
from llm.train.distributed import Distributed
from llm.train.optim import build_optimizer
from llm.train.step import NonFiniteGuard, train_step
from tests.conftest import make_config, objectives_served

CPU = torch.device("cpu")
BATCH, BLOCK = 2, 16
POSITIONS = {"learn": dict(pos_emb="learn", norm="layer"), "rope": dict(pos_emb="rope", norm="rms")}
MOE = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "ffn": "moe", "n_exp": 6, "n_shared": 1, "n_act": 3, "up_dim": 32}
MOD = [pytest.param({"mod": True, "capacity": 0.25}, id="mod"),
       pytest.param({**MOE, "mod": True, "capacity": 0.25, "aux_free": True}, id="mod_moe")]  # mixture-of-depths


class FixedBatches:
    """A loader that returns the same batch of inputs and targets, (B, T) token ids each, every time."""

    batching = None  # the plain next-token rows: no extra parts

    def __init__(self, vocab_size: int):
        self.x = torch.randint(0, vocab_size, (BATCH, BLOCK))  # (B, T)
        self.y = torch.randint(0, vocab_size, (BATCH, BLOCK))  # (B, T)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


SAME_GRAPH = {"mla_no_q_latent", "mla_head_dims", "mamba_rank2", "hyena_order3"}
"""Examples that change only sizes of their kind's graph (its control flow is its first example's)."""


def mixer_examples() -> list:
    """Every example spec of every registered mixer kind but those of SAME_GRAPH, with a dense MLP (and the
    objective key of a kind that serves only a bidirectional one)."""
    return [pytest.param(with_objective(spec), id=name)
            for kind in MIXERS.values() for name, spec in kind.examples.items() if name not in SAME_GRAPH]


def with_objective(spec: dict) -> dict:
    """The spec with "objective": "mlm" when its mixer serves no causal objective (popped by `model_config`)."""
    return spec if "clm" in objectives_served(spec) else {**spec, "objective": "mlm"}


def model_config(spec: dict | list[dict], **model_fields):
    """make_config of one layer of `spec`, or of a list of specs (a spec's "objective" key, if any, moved to the
    model's fields)."""
    if isinstance(spec, dict) and "objective" in spec:
        spec = dict(spec)
        model_fields["objective"] = spec.pop("objective")
    return make_config(spec, n_embd=48, n_layer=1, block_size=BLOCK, **model_fields)


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
    model = build_model(model_config(spec, **model_fields)).train()
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
def test_every_mixer_kind_compiles_whole_once(spec):
    """With RoPE, which each attention kind applies inside; learned positions are added before the blocks, the same
    code for every kind (the default model's test and the mixture-of-depths tests compile them)."""
    train_compiled(spec, **POSITIONS["rope"])


@pytest.mark.parametrize("spec", ffn_examples())
def test_every_feed_forward_kind_compiles_whole_once(spec):
    train_compiled(spec, **POSITIONS["rope"])


@pytest.mark.parametrize("spec", MOD)
@pytest.mark.parametrize("positions", POSITIONS)
def test_mixture_of_depths_compiles_whole_once(spec, positions):
    train_compiled(spec, **POSITIONS[positions])


def test_mixture_of_depths_with_activation_recomputation_compiles_whole_once():
    train_compiled({"mod": True}, act_recomp=True, **POSITIONS["rope"])


def test_activation_recomputation_compiles_whole_once():
    train_compiled({**MOE, "router_score": "sigmoid", "aux_free": True}, act_recomp=True, **POSITIONS["rope"])


@pytest.mark.parametrize("mtp,act_recomp", [("sequential", False), ("sequential", True), ("parallel", False)])
def test_multi_token_prediction_compiles_whole_once(mtp, act_recomp):
    train_compiled(MOE, act_recomp=act_recomp, mtp=mtp, n_mtp_tokens=2, **POSITIONS["rope" if act_recomp else "learn"])


def test_moe_under_bf16_autocast_compiles_whole_once_with_grouped_mm_in_the_graph(monkeypatch):
    def refuse(*args):
        raise AssertionError("bf16 experts should run torch's grouped matmul in the graph, not the opaque operator")

    monkeypatch.setattr(experts, "opaque_grouped_mm", refuse)
    train_compiled(MOE, dtype=torch.bfloat16)


def test_nsa_under_bf16_autocast_compiles_whole_once():
    train_compiled({**MIXERS["nsa"].examples["nsa_strided"]}, dtype=torch.bfloat16, **POSITIONS["rope"])


NGPT = dict(arch="ngpt", pos_emb="rope")  # the normalized transformer
NGPT_SPECS = [pytest.param({"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "non_linearity": "swiglu"}, id="ngpt_gqa"),
              pytest.param({"attn": "mha", "n_head": 4, "non_linearity": "geglu"}, id="ngpt_mha")]


@pytest.mark.parametrize("spec", NGPT_SPECS)
@pytest.mark.parametrize("act_recomp", [False, True])
def test_ngpt_compiles_whole_once(spec, act_recomp):
    train_compiled(spec, act_recomp=act_recomp, **NGPT)


def test_ngpt_under_bf16_autocast_compiles_whole_once():
    train_compiled(NGPT_SPECS[0].values[0], dtype=torch.bfloat16, tie_embeddings=False, **NGPT)


ROPE_SCALINGS = [pytest.param(dict(rope_scaling="linear", rope_factor=2.0), id="linear"),
                 pytest.param(dict(rope_scaling="llama3", rope_original_max_position_embeddings=8), id="llama3"),
                 pytest.param(dict(rope_scaling="yarn", rope_factor=4.0, rope_mscale=0.7, rope_mscale_all_dim=1.0,
                                   rope_original_max_position_embeddings=8), id="yarn")]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling_compiles_whole_once(scaling):
    train_compiled(MIXERS["gqa"].examples["gqa"], **POSITIONS["rope"], **scaling)


def test_yarn_rope_scaling_compiles_whole_once_in_sparse_attention():
    """NSA applies the same rotary tables in its three branches; yarn is the scaling with the most to them."""
    train_compiled(MIXERS["nsa"].examples["nsa"], **POSITIONS["rope"], **ROPE_SCALINGS[2].values[0])


def test_hyena_under_bf16_autocast_compiles_whole_once():
    """Its FFT convolutions run in fp32 inside the bf16 graph."""
    train_compiled({**MIXERS["hyena"].examples["hyena_order3"]}, dtype=torch.bfloat16, **POSITIONS["rope"])


@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_hyena_compiles_whole_once_with_inductor():
    """Inductor has no code generation for complex tensors: the FFTs stay library calls in the graph."""
    train_compiled({**MIXERS["hyena"].examples["hyena"]}, backend="inductor", steps=2)


def test_moe_padded_fallback_compiles_whole_once(monkeypatch):
    monkeypatch.setattr(experts, "GROUPED_MM", None)
    train_compiled(MOE)


def test_muon_steps_compile_the_model_whole_once():
    """The model compiles as with AdamW; Muon's step runs eagerly after it, as AdamW's does."""
    train_compiled(MOE, optimizer="muon", **POSITIONS["learn"])


def test_default_model_compiles_whole_once_with_inductor():
    train_compiled({}, backend="inductor", steps=2)


HOST_READS = ["item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"]


@pytest.mark.parametrize("spec,fields", [pytest.param(p.values[0], {}, id=p.id)
                                         for p in mixer_examples() + ffn_examples() + MOD]
                         + [pytest.param(MOE, dict(mtp=mtp, n_mtp_tokens=2), id=f"moe-mtp-{mtp}")
                            for mtp in ("sequential", "parallel")]
                         + [pytest.param(p.values[0], NGPT, id=p.id) for p in NGPT_SPECS]
                         + [pytest.param(MOE, dict(optimizer="muon"), id="moe-muon")])
def test_training_step_reads_nothing_back_from_the_device(spec, fields, monkeypatch, tmp_path):
    """train_step with gradient accumulation and the non-finite guard's record, as the loop runs them on steps that
    are not logged, never reads a tensor's value on the host (on CUDA each read would wait for the device)."""
    fields = dict(fields)
    optimizer = fields.pop("optimizer", "adamw")  # a Trainconfig field; the others are the model's
    model = build_model(model_config(spec, **fields)).train()
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


RECURRENT = dict(arch="recurrent", n_prelude=1, n_core=2, n_coda=1, mean_recurrence=3, r_max=8, k_trunc=2,
                 eval_recurrence=3)


def test_recurrent_depth_at_a_fixed_recurrence_compiles_whole_once():
    """r = mean_recurrence 3 with k_trunc 2: one iteration without gradients, two with, all in one graph (the
    concat adapter: the add mode is the same graph less one matmul)."""
    spec = [dict(attn="gqa", n_head=4, n_kv_heads=2)] * 4
    train_compiled(spec, adapter_mode="concat", **RECURRENT, **POSITIONS["rope"])


def test_recurrent_depth_blocks_compile_once_per_grad_mode_whatever_the_recurrence():
    """As the loop compiles a recurrent-depth model, block by block: the first step (r 3 > k_trunc 2) runs the blocks
    with and without gradients, and steps with other draws of r compile nothing new."""
    model = build_model(make_config([dict(attn="gqa", n_head=4, n_kv_heads=2)] * 4, n_embd=48, block_size=BLOCK,
                            **RECURRENT, **POSITIONS["rope"])).train()
    for block in model.blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    cfg = Trainconfig(device="cpu")
    loader, optimizer, job = FixedBatches(model.config.vocab_size), build_optimizer(model, cfg, CPU), Distributed()
    recurrences = []
    for step in range(6):
        model.before_step(step, 1)
        recurrences.append(model.recurrence.train_recurrence)
        if step == 0:
            model.recurrence.train_recurrence = 3  # r > k_trunc: grad and no-grad iterations
        result = train_step(model, model, loader, 1, Precision(CPU, torch.float32, None), optimizer, cfg, job)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert len(set(recurrences)) >= 3, recurrences
    assert graphs == 2  # every block shares one graph with gradients and one without
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.isfinite(result.loss) and torch.isfinite(result.grad_norm)


def test_recurrent_depth_training_step_reads_nothing_back_from_the_device(monkeypatch, tmp_path):
    model = build_model(make_config({}, n_embd=48, n_layer=4, block_size=BLOCK, **RECURRENT)).train()
    cfg = Trainconfig(device="cpu")
    loader, optimizer, job = FixedBatches(model.config.vocab_size), build_optimizer(model, cfg, CPU), Distributed()
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, lambda self, *args, **kwargs: pytest.fail("read on the host"))
    for step, accum_steps in enumerate((1, 2)):
        model.before_step(step, 1)
        train_step(model, model, loader, accum_steps, Precision(CPU, torch.float32, None), optimizer, cfg, job)
