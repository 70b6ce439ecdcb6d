"""Per-layer specs from `--layer_configs` (a JSON list) or `--layer_configs_jsonl` (one object per line)."""
import json
from pathlib import Path

from .errors import ConfigError, read_user_text
from .fields import dataclass_from_dict, kind_spelling, unique_keys
from .schema import BlockConfig

REQUIRED_KEYS = ("attn", "n_head", "ffn", "up_dim", "non_linearity")  # "moe": true|false also names the ffn kind


def block_from_spec(spec: dict, base: BlockConfig, where: str) -> BlockConfig:
    """One layer from a JSON object; keys it omits (beyond the required ones) come from `base` (the flags)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(spec).__name__}")
    spec = kind_spelling(spec, "moe", where)
    block = dataclass_from_dict(BlockConfig, spec, where, base=base)
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise ConfigError(f'{where}: missing required key "{missing[0]}" (every layer spec needs {", ".join(REQUIRED_KEYS)})')
    return block


def parse_layer_configs(text: str, base: BlockConfig) -> tuple[list[BlockConfig], list[str]]:
    """Layers from a JSON list of objects; returns the specs and where each came from."""
    try:
        specs = json.loads(text, object_pairs_hook=unique_keys("--layer_configs"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--layer_configs is not valid JSON ({e.msg} at char {e.pos}); pass a JSON list of objects") from None
    if not isinstance(specs, list) or not specs:
        raise ConfigError("--layer_configs must be a non-empty JSON list of objects, one per layer")
    wheres = [f"--layer_configs item {i}" for i in range(len(specs))]
    return [block_from_spec(s, base, w) for s, w in zip(specs, wheres)], wheres


def read_layer_configs_jsonl(path: str, base: BlockConfig) -> tuple[list[BlockConfig], list[str]]:
    """Layers from a JSONL file, one object per non-blank line; returns the specs and where each came from."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--layer_configs_jsonl={path!r}: no such file; pass the path of a JSONL file of layer specs")
    blocks, wheres = [], []
    for number, line in enumerate(read_user_text(file, f"--layer_configs_jsonl={path!r}").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            spec = json.loads(line, object_pairs_hook=unique_keys(where))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        blocks.append(block_from_spec(spec, base, where))
        wheres.append(where)
    if not blocks:
        raise ConfigError(f"--layer_configs_jsonl={path!r} holds no layer specs; write one JSON object per line")
    return blocks, wheres
