"""Configuration: dataclasses, presets, validation and the command line."""
from .cli import config_dict, parse
from .errors import ConfigError, exit_on_user_error
from .expr import eval_int_expr
from .presets import PRESETS
from .schema import ACTIVATION_ALIASES, ACTIVATIONS, GATED_ACTIVATIONS, BlockConfig, LLMconfig, Trainconfig
from .validate import resolve_block, total_batch_tokens, validate, validate_model

__all__ = [
    "ACTIVATIONS", "ACTIVATION_ALIASES", "GATED_ACTIVATIONS", "PRESETS", "BlockConfig", "ConfigError", "LLMconfig",
    "Trainconfig", "config_dict", "eval_int_expr", "exit_on_user_error", "parse", "resolve_block",
    "total_batch_tokens", "validate", "validate_model",
]
