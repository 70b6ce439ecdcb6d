"""Saving model weights (safetensors, keys of the uncompiled module), atomically."""
from pathlib import Path

from safetensors.torch import save_model
from torch import nn

from ..files import write_atomically


def save_weights(model: nn.Module, folder: Path, name: str) -> Path:
    """Writes folder/name.safetensors through a temporary file, so a crash leaves the previous one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    write_atomically(path, lambda tmp: save_model(model, str(tmp)))
    return path
