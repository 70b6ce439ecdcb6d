"""Float8 training through torchao: which linear layers compute in float8, and the conversion.

The linear layers of the blocks are swapped for torchao's Float8Linear with tensorwise current scaling (each
tensor's scale comes from its own absolute maximum at every step, not from a history of earlier steps). As in
BioNeMo, the first and the last block stay in 16-bit precision, and so do the embedding, the output head, the MoE
router (computed in fp32) and the routed experts (grouped matmuls, not linear layers).
"""
import torch
from torch import nn

from ..config import ConfigError
from ..model.ffn.router import Router

FIX_INSTALL = "pip install 'llm[fp8]'"
MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.0


def fp8_plan(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules to compute in float8: those of every block but the first and the last, except
    the MoE routers' gates and layers whose in or out features are not multiples of 16 (float8 matmuls need them)."""
    in_router = {id(m) for router in model.modules() if isinstance(router, Router) for m in router.modules()}
    inner = range(1, len(model.blocks) - 1)
    return [f"blocks.{i}.{name}" for i in inner for name, m in model.blocks[i].named_modules()
            if isinstance(m, nn.Linear) and id(m) not in in_router
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def check_float8_device(device: torch.device, flag: str) -> None:
    """Refuses `--flag` with a one-line ConfigError unless `device` is a GPU with float8 matmuls."""
    if device.type != "cuda":
        raise ConfigError(f"{flag} needs a GPU with float8 (compute capability 8.9+: Ada, Hopper, Blackwell) but the "
                          f"run is on {device.type}; drop --{flag}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"{flag} needs a GPU with float8 (compute capability 8.9+: Ada, Hopper, Blackwell) but this "
                          f"one is {capability[0]}.{capability[1]} ({torch.cuda.get_device_name(device)}); drop "
                          f"--{flag}")


def convert_to_fp8(model: nn.Module, device: torch.device) -> list[str]:
    """Swaps the planned linear layers of `model` for torchao's Float8Linear in place (before wrapping and compiling)
    and returns their names. Refused with a one-line ConfigError on CPU, on GPUs below compute capability 8.9,
    without torchao, and when no layer qualifies."""
    check_float8_device(device, "fp8")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError(f"fp8 needs torchao, which is not installed; {FIX_INSTALL} or drop --fp8") from None
    plan = fp8_plan(model)
    if not plan:
        raise ConfigError("fp8 has no linear layer to convert: the first and last blocks stay in 16-bit and the others "
                          "need in/out features that are multiples of 16; add layers or drop --fp8")
    names = set(plan)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=lambda module, fqn: fqn in names)
    return plan
