"""The open registries of what a model is assembled from beyond its layer kinds: block kinds (how a layer wraps its
mixer and feed-forward layer when it is not the plain pre-norm Block) and head add-ons trained beside the output
head. Code outside the package registers its own with `register_block_kind` and `register_head`."""
from torch import nn

from ..config import LLMconfig
from .block import Block
from .kinds import BlockKind, HeadKind
from .mod import ROUTED
from .mtp import MTP
from .registry import register

BLOCK_KINDS: dict[str, BlockKind] = {kind.name: kind for kind in (ROUTED,)}
HEADS: dict[str, HeadKind] = {kind.name: kind for kind in (MTP,)}


def build_block(config: LLMconfig, i: int) -> nn.Module:
    """Layer i of the model: built by the first block kind that claims it, else a plain Block."""
    kind = next((kind for kind in BLOCK_KINDS.values() if kind.claims(config, i)), None)
    return (Block if kind is None else kind.build)(config.layers[i], config)


def register_block_kind(kind: BlockKind) -> None:
    """Makes layers that `kind.claims` build with `kind.build`."""
    register(BLOCK_KINDS, kind)


def register_head(kind: HeadKind) -> None:
    """Attaches `kind.build(config)` to every model whose config it is `enabled` for."""
    register(HEADS, kind)
