"""Float8 training: which linear layers are converted, the call into torchao, and the one-line refusals (on CPU, on
GPUs without float8, without torchao), all checked on CPU."""
import sys
import types

import pytest
import torch
from torch import nn

from llm.cli import parse
from llm.config import ConfigError, Trainconfig
from llm.model import LLM, build_model
from llm.model.chunked_loss import fp8_matmul, linear_cross_entropy
from llm.train import fp8, train
from llm.train.fp8 import check_float8_device, convert_to_fp8, fp8_plan
from tests.conftest import make_config

MLA_MOE = dict(attn="mla", n_head=4, q_latent_dim=32, kv_latent_dim=32, rope_head_dim=8, ffn="moe", up_dim=64,
               non_linearity="swiglu", n_exp=17, n_shared=1, n_act=3)  # 16 routed experts: a router gate of 64 -> 16
GQA_DENSE = dict(attn="gqa", n_head=4, n_kv_heads=2, ffn="dense", up_dim=256, non_linearity="gelu")


def stack(n_layer: int = 4) -> LLM:
    """MLA with MoE below, GQA with dense MLPs above, width 64."""
    half = n_layer // 2
    return build_model(make_config([MLA_MOE] * half + [GQA_DENSE] * (n_layer - half), n_embd=64, pos_emb="rope"))


def test_plan_keeps_first_and_last_blocks_routers_experts_and_odd_sizes():
    model = stack()
    assert fp8_plan(model) == [
        "blocks.1.attn.q_proj.0",  # 64 -> 32
        "blocks.1.attn.q_proj.2",  # 32 -> 4 * (16 + 8)
        "blocks.1.attn.kv_up",  # 32 -> 4 * 2 * 16; kv_down (64 -> 32 + 8) is not a multiple of 16
        "blocks.1.attn.c_proj",
        "blocks.1.ffn.shared.c_fc",  # the shared expert; routed experts are grouped matmuls, the router stays fp32
        "blocks.1.ffn.shared.c_proj",
        "blocks.2.attn.c_attn",
        "blocks.2.attn.c_proj",
        "blocks.2.ffn.c_fc",
        "blocks.2.ffn.c_proj",
    ]
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"blocks.1.attn.kv_down", "blocks.1.ffn.router.gate", "lm_head"} <= linears - set(fp8_plan(model))


def test_two_blocks_leave_nothing_to_convert():
    assert fp8_plan(stack(2)) == []


@pytest.fixture
def cuda_gpu(monkeypatch):
    """Pretends to be on a GPU of the capability given to the returned function."""
    def set_capability(major: int, minor: int, name: str = "NVIDIA H100") -> torch.device:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return torch.device("cuda", 0)
    return set_capability


@pytest.fixture
def fake_torchao(monkeypatch):
    """A stand-in for torchao.float8 that records how it is called."""
    calls = {}

    class Float8LinearConfig:
        @staticmethod
        def from_recipe_name(name):
            return f"recipe {name}"

    def convert_to_float8_training(module, *, module_filter_fn=None, config=None):
        calls.update(module=module, config=config, converted=[
            name for name, m in module.named_modules() if isinstance(m, nn.Linear) and module_filter_fn(m, name)])
        return module

    module = types.SimpleNamespace(Float8LinearConfig=Float8LinearConfig,
                                   convert_to_float8_training=convert_to_float8_training)
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", module)
    return calls


def test_conversion_uses_current_tensorwise_scaling_and_the_plan(cuda_gpu, fake_torchao):
    model = stack()
    assert convert_to_fp8(model, cuda_gpu(9, 0)) == fp8_plan(model)
    assert fake_torchao["module"] is model and fake_torchao["config"] == "recipe tensorwise"
    assert fake_torchao["converted"] == fp8_plan(model)


def test_ada_is_enough(cuda_gpu, fake_torchao):
    convert_to_fp8(stack(), cuda_gpu(8, 9, "NVIDIA L4"))
    assert fake_torchao["converted"]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_refused_on_cpu():
    with pytest.raises(ConfigError) as error:
        convert_to_fp8(stack(), torch.device("cpu"))
    assert one_line(error) == ("fp8 needs a GPU with float8 (compute capability 8.9+: Ada, Hopper, Blackwell) but "
                               "the run is on cpu; drop --fp8")


def test_refused_on_a_gpu_without_float8(cuda_gpu, fake_torchao):
    with pytest.raises(ConfigError) as error:
        convert_to_fp8(stack(), cuda_gpu(8, 0, "NVIDIA A100"))
    assert "but this one is 8.0 (NVIDIA A100); drop --fp8" in one_line(error)


def test_refused_without_torchao(cuda_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as when it is not installed
    with pytest.raises(ConfigError) as error:
        convert_to_fp8(stack(), cuda_gpu(9, 0))
    assert one_line(error) == "fp8 needs torchao, which is not installed; pip install 'llm[fp8]' or drop --fp8"


def test_refused_with_nothing_to_convert(cuda_gpu, fake_torchao):
    with pytest.raises(ConfigError, match="fp8 has no linear layer to convert") as error:
        convert_to_fp8(stack(2), cuda_gpu(9, 0))
    one_line(error)
    assert "module" not in fake_torchao


def test_fp8_on_cpu_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"fp8 needs a GPU with float8 .* but device=cpu; drop --fp8"):
        parse(["--fp8", "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_run_converts_the_model_it_builds(char_data, tmp_path, monkeypatch):
    """The loop calls the conversion with the model it builds, on the device it picked (here CPU: refused)."""
    seen = []
    monkeypatch.setattr("llm.train.loop.convert_to_fp8", lambda model, device: seen.append(device) or
                        fp8.convert_to_fp8(model, device))
    argv = ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--fp8", "--max_iters", "1"]
    with pytest.raises(ConfigError, match="fp8 needs a GPU with float8"):
        train(*parse(argv))
    assert seen == [torch.device("cpu")]


# --- the FP8 head (--fp8_head): the chunked loss's matmuls in float8 -------------------------------------------------


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("formats", [(torch.float8_e4m3fn, torch.float8_e4m3fn),
                                     (torch.float8_e5m2, torch.float8_e4m3fn)], ids=["e4m3", "e5m2_e4m3"])
def test_fp8_matmul_is_the_matmul_to_float8_precision(formats):
    """Sizes that are not multiples of 16 are padded; per-tensor scales keep a tensor of any magnitude in range."""
    a, b = torch.randn(37, 50) * 1e-4, torch.randn(21, 50) * 300
    got = fp8_matmul(a, b, *formats)
    assert got.shape == (37, 21) and got.dtype == torch.float32
    assert relative(got, a @ b.T) < (0.06 if formats[0] == torch.float8_e4m3fn else 0.12)


def test_chunked_loss_with_an_fp8_head_follows_the_fp32_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(45, 40, requires_grad=True)
    weight = (torch.randn(70, 40) * 0.1).requires_grad_()
    targets = torch.randint(0, 65, (45,))
    exact = linear_cross_entropy(hidden, weight, targets, 65, -1, chunk=16)
    fp8_loss = linear_cross_entropy(hidden, weight, targets, 65, -1, chunk=16, fp8=True)
    assert abs(fp8_loss.item() - exact.item()) < 0.01 * exact.item()
    for got, want in zip(torch.autograd.grad(fp8_loss, (hidden, weight)), torch.autograd.grad(exact, (hidden, weight))):
        assert relative(got, want) < 0.08  # e5m2 gradients: two mantissa bits


def test_the_run_puts_the_token_loss_head_in_fp8():
    model = build_model(make_config(n_embd=48))
    idx = torch.randint(0, 97, (2, 32))
    exact = model(idx, idx).loss
    model.configure_run(Trainconfig(fp8_head=True))
    assert model.objective.fp8
    fp8_loss = model(idx, idx).loss
    assert fp8_loss != exact and abs(fp8_loss - exact) < 0.01 * exact


def test_fp8_head_is_refused_on_cpu_and_under_diffusion():
    with pytest.raises(ConfigError) as error:
        check_float8_device(torch.device("cpu"), "fp8_head")
    assert one_line(error) == ("fp8_head needs a GPU with float8 (compute capability 8.9+: Ada, Hopper, Blackwell) "
                               "but the run is on cpu; drop --fp8_head")
    with pytest.raises(ConfigError, match=r"fp8_head needs a GPU with float8 .* but device=cpu; drop --fp8_head"):
        parse(["--fp8_head", "--device", "cpu"])
    with pytest.raises(ConfigError, match="fp8_head runs the head of the cross-entropy loss of objectives clm and mlm, "
                                          "not objective=mdlm"):
        parse(["--fp8_head", "--objective", "mdlm"])
