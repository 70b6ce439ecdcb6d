"""Type checking of config values that arrive as JSON (config files, layer specs)."""
import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError
from .schema import BlockConfig, LLMconfig, Trainconfig


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def known_fields(cls: type) -> dict[str, Any]:
    """Field name -> type annotation of a config dataclass, with tyro markers stripped."""
    hints = typing.get_type_hints(cls, include_extras=False)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unique_keys(where: str):
    """A json.loads object_pairs_hook that refuses an object naming one key twice (instead of keeping the last)."""
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigError(f'{where}: key "{key}" appears twice; keep one')
            seen.add(key)
        return dict(pairs)
    return hook


def check_keys(data: dict, cls: type, where: str) -> None:
    """Rejects keys that are not fields of `cls`, suggesting the closest field name; a layer spec naming a
    model-wide or run field is told so."""
    names = list(known_fields(cls))
    for key in data:
        if key in names:
            continue
        if cls is BlockConfig and (key in known_fields(LLMconfig) or key in known_fields(Trainconfig)):
            raise ConfigError(f'{where}: "{key}" is set for the whole model or run, not per layer; pass --{key} '
                              "instead")
        raise ConfigError(f'{where}: unknown key "{key}"{did_you_mean(str(key), names)}')


def coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Returns `value` checked against `annotation` (int, float, bool, str, Literal, list[X], X | None)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return coerce(value, inner, key, where)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(choices)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}={value!r} must be a list, got {type(value).__name__}")
        (inner,) = typing.get_args(annotation)
        return [coerce(item, inner, key, where) for item in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(annotation)
    if ok is None:
        raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
    if not ok:
        raise ConfigError(f"{where}: {key}={value!r} must be {annotation.__name__}, got {type(value).__name__}")
    return float(value) if annotation is float else value


# Boolean keys that spell a kind: "moe": true|false is "ffn": "moe"|"dense" (in a layer spec), and the earlier
# "recurrent_depth": true is "arch": "recurrent" (false: the key is dropped).
SPELLINGS = {"moe": ("ffn", "moe", "dense"), "recurrent_depth": ("arch", "recurrent", None)}


def kind_spelling(section: dict, switch: str, where: str) -> dict:
    """The section with its `switch` key (of SPELLINGS) rewritten as the kind field it spells; both keys must
    then agree."""
    if switch not in section:
        return section
    field, on, off = SPELLINGS[switch]
    section = dict(section)
    value = section.pop(switch)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {switch}={value!r} must be bool, got {type(value).__name__}")
    spelled = on if value else off
    if spelled is not None and section.setdefault(field, spelled) != spelled:
        raise ConfigError(f'{where}: "{switch}": {str(value).lower()} contradicts "{field}": "{section[field]}"; '
                          f'keep only "{field}"')
    return section


def dataclass_from_dict(cls: type, data: dict, where: str, base: Any = None) -> Any:
    """Builds `cls` from `data` over `base` (or the defaults), checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    check_keys(data, cls, where)
    hints = known_fields(cls)
    values = {k: coerce(v, hints[k], k, where) for k, v in data.items()}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def model_config_from_dict(data: dict, where: str) -> LLMconfig:
    """An LLMconfig with its per-layer specs from JSON (the "model" part of a saved config.json)."""
    fields = {k: v for k, v in kind_spelling(data, "recurrent_depth", where).items() if k != "layers"}
    layers = [dataclass_from_dict(BlockConfig, kind_spelling(spec, "moe", f"{where} layer {i}"), f"{where} layer {i}")
              for i, spec in enumerate(data.get("layers", []))]
    return dataclasses.replace(dataclass_from_dict(LLMconfig, fields, where), layers=layers)
