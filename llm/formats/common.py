"""What the readers of foreign config files share: the record of keys they could not map, and layer specs in our
format."""
import dataclasses
import sys
from typing import Any

from ..config import BlockConfig, ConfigError
from ..config.layers import REQUIRED_KEYS


class Unmapped:
    """Collects the keys of one foreign file that have no meaning here, each with the reason, so that they are
    refused together in one error (or, lenient, printed as ignored)."""

    def __init__(self, path: str, fmt: str, lenient: bool):
        self.path, self.fmt, self.lenient = path, fmt, lenient
        self.keys: list[str] = []
        self.notes: list[str] = []
        self.readings: list[str] = []

    def refuse(self, key: str, why: str) -> None:
        """Records `key` (dotted, as in the file) as not mapped, for the reason `why`."""
        self.keys.append(f"{key} ({why})")

    def note(self, key: str, why: str) -> None:
        """Records `key` (dotted, with its value) as read but not a training setting: printed in one note line."""
        self.notes.append(f"{key} ({why})")

    def explain(self, key: str, how: str) -> None:
        """Records how `key` (dotted, with its value) was read where its meaning here needs saying: printed in one
        note line."""
        self.readings.append(f"{key}: {how}")

    def unknown(self, section: dict, prefix: str, known: Any) -> None:
        """Records every key of `section` that is not in `known` as unknown to the format's reader."""
        for key in section:
            if key not in known:
                self.refuse(f"{prefix}{key}", f"not a {self.fmt} key this reader knows")

    def finish(self) -> None:
        """Prints the notes in one line; raises one ConfigError listing the unmapped keys, or with lenient prints them
        as ignored."""
        if self.readings:
            print(f"note: {self.path} ({self.fmt}): read as: {'; '.join(self.readings)}", file=sys.stderr)
        if self.notes:
            print(f"note: {self.path} ({self.fmt}): not used in training: {'; '.join(self.notes)}", file=sys.stderr)
        if not self.keys:
            return
        listed = "; ".join(self.keys)
        if self.lenient:
            print(f"warning: {self.path} ({self.fmt}): ignored {listed}", file=sys.stderr)
            return
        raise ConfigError(f"{self.path} ({self.fmt}): cannot map {len(self.keys)} key(s): {listed}; "
                          "remove them or pass --lenient to ignore them")

NSA_KEYS = ("sliding_window_size", "compress_block_size", "selection_block_size", "num_selected_blocks")
"""The native-sparse-attention sizes of the modded-nanogpt configs (training.yaml holds them, null by default)."""


def take(section: dict, key: str, default: Any = None) -> Any:
    """Removes `key` from `section` and returns its value (the default when absent)."""
    return section.pop(key, default)


def expect_dict(value: Any, where: str) -> dict:
    """A copy of `value`, which must be a mapping (an absent section is empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(value).__name__}")
    return dict(value)


def layer_spec(block: BlockConfig) -> dict:
    """A layer spec in our format: the required keys and every field that differs from BlockConfig's default."""
    default = BlockConfig()
    return {f.name: getattr(block, f.name) for f in dataclasses.fields(block)
            if f.name in REQUIRED_KEYS or getattr(block, f.name) != getattr(default, f.name)}


def model_with_layers(model: dict, blocks: list[BlockConfig]) -> dict:
    """Our model section: the given fields, n_layer and one spec per layer (identical layers share one object, which
    YAML writes once as an anchor)."""
    specs, shared = [], {}
    for block in blocks:
        key = repr(block)
        specs.append(shared.setdefault(key, layer_spec(block)))
    return dict(model, n_layer=len(blocks), layers=specs)
