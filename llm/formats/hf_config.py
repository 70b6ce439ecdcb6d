"""A transformers config.json of a family llm.hf converts (GPT-2, Llama, DeepseekV3, Mamba): the model part, mapped
by llm.hf's own import (`config_from_hf`, as --init_from hf:DIR does), without weights.

A key is mapped when every value it sets in the transformers configuration is read by that import; a key that sets
nothing beyond transformers' default is accepted; any other key is refused, since the import would drop it. Token
ids and bookkeeping keys are accepted without effect (the tokenizer comes with the prepared dataset).
"""
from typing import Any

from ..config import ConfigError
from ..hf import FAMILIES, _transformers, config_from_hf
from .common import Unmapped, model_with_layers

WITHOUT_EFFECT = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache",
}
"""Bookkeeping, storage precision and token ids: the tokenizer of the prepared dataset supplies the token ids."""


class ReadRecorder:
    """Stands in for a transformers configuration and records which attributes (and which keys of dict-valued
    attributes) are read."""

    def __init__(self, config: Any, aliases: dict[str, str]):
        self._config, self._aliases, self.read = config, aliases, set()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._config, name)
        name = self._aliases.get(name, name)
        if isinstance(value, dict):
            return RecordingDict(value, name, self.read)
        self.read.add((name,))
        return value


class RecordingDict(dict):
    """A dict-valued attribute whose key reads are recorded as (attribute, key); reading it whole records it whole."""

    def __init__(self, value: dict, name: str, read: set):
        super().__init__(value)
        self._name, self._read = name, read

    def __getitem__(self, key):
        self._read.add((self._name, key))
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._read.add((self._name, key))
        return super().get(key, default)

    def __iter__(self):
        self._read.add((self._name,))
        return super().__iter__()


def leaf_paths(a: dict, b: dict, prefix: tuple = ()) -> set[tuple]:
    """The paths (key, nested key, ...) at which two transformers config dicts differ."""
    paths = set()
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            paths |= leaf_paths(x, y, prefix + (key,))
        elif x != y:
            paths.add(prefix + (key,))
    return paths


def hf_config_to_ours(data: dict, path: str, lenient: bool) -> dict:
    """Our config dict (model section only) for a transformers config.json."""
    model_type = data["model_type"]
    if model_type not in FAMILIES:
        raise ConfigError(f"{path}: transformers model_type {model_type!r} is not one llm.hf converts; supported: "
                          f"{', '.join(FAMILIES)}")
    t = _transformers()
    fields = {k: v for k, v in data.items() if k != "model_type"}
    verbosity = t.logging.get_verbosity()
    t.logging.set_verbosity_error()  # transformers' own warnings about the file would repeat once per key
    try:
        return _convert(t, model_type, fields, path, lenient)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: transformers refuses this {model_type} config: {str(e).splitlines()[0]}") from None
    finally:
        t.logging.set_verbosity(verbosity)


def _convert(t, model_type: str, fields: dict, path: str, lenient: bool) -> dict:
    """hf_config_to_ours once transformers is imported and quiet."""
    hf_cfg = t.AutoConfig.for_model(model_type, **fields)
    aliases = dict(getattr(hf_cfg, "attribute_map", {}))
    unmapped = Unmapped(path, "transformers config.json", lenient)
    refused = [r for r in FAMILIES[model_type].refusals if not r.accepts(hf_cfg)]  # values the import refuses
    for refusal in refused:
        unmapped.refuse(refusal.field, f"{getattr(hf_cfg, refusal.field)!r}: {refusal.reason}")
    fields = {k: v for k, v in fields.items() if aliases.get(k, k) not in {r.field for r in refused}}
    hf_cfg = t.AutoConfig.for_model(model_type, **fields)
    recorder = ReadRecorder(hf_cfg, aliases)
    config = config_from_hf(recorder)
    full = hf_cfg.to_dict()
    for key in fields:
        if key in WITHOUT_EFFECT:
            continue
        without = t.AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if k != key}).to_dict()
        unread = [p for p in leaf_paths(full, without) if not any(p[:n] in recorder.read for n in range(1, len(p) + 1))]
        if unread:
            shown = ", ".join(".".join(map(str, p)) for p in sorted(unread, key=str))
            unmapped.refuse(key, f"sets {shown}, which llm.hf's {FAMILIES[model_type].title} import does not read")
    unmapped.finish()
    ours = set(FAMILIES[model_type].our_fields(hf_cfg)) - {"layers"} | {"vocab_size", "tie_embeddings"}
    model = {name: getattr(config, name) for name in sorted(ours)}
    return {"model": model_with_layers(model, config.layers)}
