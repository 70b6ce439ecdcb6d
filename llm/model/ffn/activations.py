"""Activation functions by name; gated ones multiply act(gate) by a second projection.

The names a config may use are the `Activation` Literal in `llm/config/schema.py` (aliases included); this module
maps each to its function, and is the one place that says which activations are gated.
"""
from functools import partial

import torch
import torch.nn.functional as F

from ...config import ACTIVATION_ALIASES


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, the squared ReLU of Primer (So et al. 2021) and the modded-nanogpt speedrun's MLP."""
    return F.relu(x).square()


PLAIN = {
    "relu": F.relu,
    "relu2": relu_squared,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "selu": F.selu,
    "celu": F.celu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
# Gated linear units: the activation applied to the gate half (GLU uses a sigmoid gate).
GATED = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu, "glu": torch.sigmoid}


def activation(name: str):
    """(function, gated) for an activation name, aliases (swish, lrelu) included."""
    name = ACTIVATION_ALIASES.get(name, name)
    return (GATED[name], True) if name in GATED else (PLAIN[name], False)
