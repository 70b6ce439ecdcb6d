"""Config files of the reference systems, read into our own format: a transformers config.json, a HELM model config,
an llm720 YAML and a Hydra-style modded-nanogpt model config (see docs/configuration.md for what each maps).

`to_ours(path, data, lenient)` returns our config dict ({"model": ..., "train": ...}) for a file's parsed contents;
our own files pass through unchanged.
"""
import json
from pathlib import Path

from ..config import ConfigError, read_user_text
from ..config.fields import unique_keys
from .helm import helm_to_ours, is_helm
from .hydra import hydra_to_ours, is_hydra
from .llm720 import is_llm720, llm720_to_ours

OURS = {"model", "train"}


def is_hf(data: dict) -> bool:
    """A transformers config.json names its model_type and has none of the other formats' sections."""
    return "model_type" in data and "model_config" not in data


def format_of(data: dict) -> str:
    """The name of the format of a parsed config file: hf, helm, llm720, hydra, or ours (also for a file no format
    recognises, so that our reader names its unknown keys)."""
    for name, test in (("hydra", is_hydra), ("llm720", is_llm720), ("helm", is_helm), ("hf", is_hf)):
        if not set(data) <= OURS and test(data):
            return name
    return "ours"


def to_ours(path: str, data: dict, lenient: bool = False) -> dict:
    """Our config dict for the parsed contents of `path` in any recognised format."""
    name = format_of(data)
    if name == "ours":
        return data
    if name == "hf":
        from .hf_config import hf_config_to_ours  # imports torch and transformers

        return hf_config_to_ours(data, path, lenient)
    return {"helm": helm_to_ours, "llm720": llm720_to_ours, "hydra": hydra_to_ours}[name](data, path, lenient)


def load_mapping(path: str) -> dict:
    """The parsed contents of a .json or .yaml config file (a mapping)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config={path!r}: no such file")
    text = read_user_text(file, f"--config={path!r}")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config={path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    elif file.suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=unique_keys(f"--config={path!r}"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config={path!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        raise ConfigError(f"--config={path!r}: unknown file type; use a .json or .yaml file")
    if not isinstance(data, dict):
        raise ConfigError(f"--config={path!r} must hold an object with keys model and train")
    return data
