"""The open registry of architecture kinds: the model's `arch` string -> its record (`kinds.ArchKind`).

Adding an architecture is one new file here that subclasses `LLM` and defines its record, and one line below; code
outside the package calls `register_arch` before it builds a model or parses a config (docs/extending.md).
"""
from ...config import LLMconfig
from ..kinds import ArchKind
from ..llm import LLM
from ..registry import register
from .gpt import GPT
from .hnet import HNET
from .megabyte import MEGABYTE
from .ngpt import NGPT
from .recurrent import RECURRENT

ARCHS: dict[str, ArchKind] = {kind.name: kind for kind in (GPT, NGPT, RECURRENT, MEGABYTE, HNET)}


def register_arch(kind: ArchKind) -> None:
    """Makes `arch: kind.name` available in flags and config files."""
    register(ARCHS, kind)


def build_model(config: LLMconfig) -> LLM:
    """The model of `config.arch`, built from the config and its per-layer specs."""
    return ARCHS[config.arch].build(config)
