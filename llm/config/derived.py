"""Values derived from the config dataclasses without torch: the resolved config as JSON data, per-layer defaults,
tokens and micro-steps per step, run directory names and data mixtures."""
import dataclasses
import math
import re
from dataclasses import replace

from .errors import ConfigError, require
from .expr import eval_int_expr
from .schema import BlockConfig, LLMconfig, Trainconfig


def config_dict(model: LLMconfig, train: Trainconfig) -> dict:
    """The resolved config as plain JSON-serialisable data (what --print_config and checkpoints write)."""
    return {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}


def resolve_block(block: BlockConfig, n_embd: int) -> BlockConfig:
    """Fills derived per-layer defaults (up_dim = 4 * n_embd when unset)."""
    return replace(block, up_dim=4 * n_embd) if block.up_dim is None else block


def run_dir_name(run_name: str) -> str:
    """A path-safe version of a run name ('trial_run_w/o_mix' -> 'trial_run_w_o_mix'); refuses a name that has
    nothing left ('', '..', '/')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("._")
    require(bool(name), f"wandb_run_name={run_name!r} names no directory; pass a name with letters or digits, "
                        "as --wandb_run_name my_run")
    return name


def total_batch_tokens(t: Trainconfig, m: LLMconfig, world_size: int = 1) -> int:
    """Tokens per optimizer step: the total_batch_size_str expression, or unset one micro-batch per rank."""
    if t.total_batch_size_str is None:
        return t.batch_size * m.block_size * world_size
    return eval_int_expr(t.total_batch_size_str, "total_batch_size_str")


def parse_mix(text: str) -> dict[str, float]:
    """'name:weight,...' -> {name: weight / total}; names unique, weights positive finite numbers."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"data_mix={text!r}: {part.strip()!r} is not NAME:WEIGHT with a positive weight; write "
                              "it as 'fineweb:0.7,tinystories:0.3'")
        if name in weights:
            raise ConfigError(f"data_mix={text!r} names {name!r} twice; give each dataset once")
        weights[name] = weight
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def micro_steps(t: Trainconfig, m: LLMconfig, world_size: int = 1) -> int:
    """Micro-steps per optimizer step: total tokens / (batch_size * block_size * world_size), which must divide."""
    total = total_batch_tokens(t, m, world_size)
    micro = t.batch_size * m.block_size * world_size
    ranks = f" * world_size {world_size}" if world_size > 1 else ""
    require(total > 0 and total % micro == 0,
            f"total_batch_size_str={t.total_batch_size_str!r} = {total} tokens is not a positive multiple of "
            f"batch_size * block_size{ranks} = {micro}; change one of them")
    return total // micro
