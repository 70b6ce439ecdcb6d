"""Configuration: the dataclasses, presets, field helpers and the values derived from them (no torch, no argv)."""
from .derived import config_dict, micro_steps, parse_mix, resolve_block, run_dir_name, total_batch_tokens
from .errors import ConfigError, exit_on_user_error, read_user_text, require, require_folder
from .expr import eval_int_expr
from .presets import PRESETS
from .schema import ACTIVATION_ALIASES, BlockConfig, LLMconfig, Trainconfig

__all__ = [
    "ACTIVATION_ALIASES", "PRESETS", "BlockConfig", "ConfigError", "LLMconfig", "Trainconfig", "config_dict",
    "eval_int_expr", "exit_on_user_error", "micro_steps", "parse_mix", "read_user_text", "require", "require_folder",
    "resolve_block", "run_dir_name", "total_batch_tokens",
]
