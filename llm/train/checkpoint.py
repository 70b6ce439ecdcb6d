"""Saving model weights (safetensors, keys of the uncompiled module) and the config, atomically."""
import json
import os
from pathlib import Path

from safetensors.torch import save_model
from torch import nn


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(model: nn.Module, config: dict, folder: Path, name: str) -> Path:
    """Writes folder/name.safetensors and folder/config.json through temporary files, so a crash leaves the old ones."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    _replace_atomically(tmp, path)
    config_tmp = folder / "config.json.tmp"
    config_tmp.write_text(json.dumps(config, indent=2))
    _replace_atomically(config_tmp, folder / "config.json")
    return path
