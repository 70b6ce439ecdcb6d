"""The open registries of layer kinds: a config string (`attn`, `ffn`, `objective`) -> the kind's record.

Adding a kind is one new file that defines its record (see `kinds.py` and docs/extending.md) and one line below.
Code outside the package (a test, a research fork) registers its own kinds with the `register_*` functions before
it builds a model or parses a config; configs then name them like the built-in ones.
"""
from .ffn.mlp import DENSE
from .ffn.moe import MOE
from .ffn.none import NONE
from .ffn.peer import PEER
from .kinds import FFNKind, MixerKind, ObjectiveKind
from .mixers.gqa import GQA, MHA, MQA
from .mixers.hyena import HYENA
from .mixers.mamba import BIMAMBA, MAMBA
from .mixers.mla import MLA
from .mixers.nsa import NSA
from .objectives.clm import CLM
from .objectives.d3pm import D3PM
from .objectives.mdlm import MDLM
from .objectives.mlm import MLM
from .objectives.sedd import SEDD

MIXERS: dict[str, MixerKind] = {kind.name: kind for kind in (MHA, MQA, GQA, MLA, NSA, HYENA, MAMBA, BIMAMBA)}
FFNS: dict[str, FFNKind] = {kind.name: kind for kind in (DENSE, MOE, PEER, NONE)}
OBJECTIVES: dict[str, ObjectiveKind] = {kind.name: kind for kind in (CLM, MLM, MDLM, SEDD, D3PM)}


def register(registry: dict, kind) -> None:
    """Adds `kind` under its name; another kind of that name is refused."""
    if kind.name in registry and registry[kind.name] is not kind:
        raise ValueError(f"a kind named {kind.name!r} is already registered; choose another name")
    registry[kind.name] = kind


def register_mixer(kind: MixerKind) -> None:
    """Makes `attn: kind.name` available in flags, layer specs and config files."""
    register(MIXERS, kind)


def register_ffn(kind: FFNKind) -> None:
    """Makes `ffn: kind.name` available in flags, layer specs and config files."""
    register(FFNS, kind)


def register_objective(kind: ObjectiveKind) -> None:
    """Makes `objective: kind.name` available."""
    register(OBJECTIVES, kind)
