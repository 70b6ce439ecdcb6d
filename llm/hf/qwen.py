"""Qwen2 (Qwen2ForCausalLM) and Qwen3 (Qwen3ForCausalLM): Llama's layers with biases on q/k/v only (Qwen2) or a
per-head RMSNorm on queries and keys (Qwen3), and sliding windows on the layers that layer_types names."""
import dataclasses

from ..config import ConfigError, LLMconfig
from ..model.mixers.gqa import head_size, kv_heads
from .common import (
    LLAMA_LIKE_MAPPED,
    SILU_ONLY,
    Family,
    Refusal,
    Weight,
    hf_rope_rms_fields,
    llama_like_layer,
    our_rope_rms_fields,
    refuse,
    same,
    uniform,
)
from .llama import LAYER_WEIGHTS as LLAMA_LAYER_WEIGHTS
from .llama import WEIGHTS, k_rows, q_rows, v_rows
from .llama import check as llama_check

SLIDING, FULL = "sliding_attention", "full_attention"


def check_qwen(config: LLMconfig, title: str, qk_norm: bool) -> None:
    """Llama's requirements without its bias flag, qk_norm on all layers (Qwen3) or none (Qwen2), q/k/v biases
    alike on all layers, and one window size for the windowed layers."""
    llama_check(dataclasses.replace(config, layers=[dataclasses.replace(b, qkv_bias=False, qk_norm=False)
                                                    for b in config.layers]))
    if config.bias:
        refuse(f"{title} has no biases on the output projection and MLP; train without --bias"
               + (" (--qkv_bias biases q, k and v only)" if not qk_norm else ""))
    uniform(config.layers, "qkv_bias", "qk_norm")
    if config.layers[0].qk_norm != qk_norm:
        refuse(f"{title} {'always has' if qk_norm else 'has no'} per-head q/k RMSNorm; train "
               f"{'with' if qk_norm else 'without'} --qk_norm")
    if qk_norm and config.layers[0].qkv_bias:
        refuse(f"{title}'s attention_bias biases the output projection too; train without --qkv_bias")
    same([b.window for b in config.layers if b.window is not None] or [None], "window of the windowed layers")


def window_fields(config: LLMconfig) -> dict:
    """Qwen's sliding-window fields: layer_types naming each layer's attention, and the one window size."""
    window = next((b.window for b in config.layers if b.window is not None), None)
    return dict(use_sliding_window=window is not None, sliding_window=window,
                layer_types=[SLIDING if b.window is not None else FULL for b in config.layers])


def llama_like_fields(config: LLMconfig) -> dict:
    """The arguments a Qwen configuration shares with Llama's (heads, key/value heads, MLP width)."""
    block = config.layers[0]
    return dict(hf_rope_rms_fields(config), num_attention_heads=block.n_head, num_key_value_heads=kv_heads(block),
                intermediate_size=block.up_dim, **window_fields(config))


def our_layers(hf_cfg, title: str, **fields) -> list:
    """Our layers for a Qwen configuration: Llama-like, windowed where layer_types says sliding_attention."""
    block = llama_like_layer(hf_cfg, title, **fields)
    types = hf_cfg.layer_types or [FULL] * hf_cfg.num_hidden_layers
    unknown = sorted(set(types) - {SLIDING, FULL})
    if unknown:
        raise ConfigError(f"cannot import {title} with layer_types {unknown[0]!r}: only {SLIDING} and {FULL} map here")
    windowed = dataclasses.replace(block, window=hf_cfg.sliding_window)
    return [windowed if t == SLIDING and hf_cfg.sliding_window else block for t in types]


def qwen2_check(config: LLMconfig) -> None:
    """Qwen2: Llama's layers, biases on q/k/v only (exported as zeros without --qkv_bias), no q/k norm, heads
    n_embd // n_head wide (Qwen2Config has no head_dim)."""
    check_qwen(config, "Qwen2", qk_norm=False)
    if any(head_size(b, config) * b.n_head != config.n_embd for b in config.layers):
        refuse("Qwen2Config has no head_dim: its heads are hidden_size / num_attention_heads wide; train without "
               "--head_dim")


def qwen2_hf_fields(config: LLMconfig) -> dict:
    """Qwen2Config's arguments."""
    return llama_like_fields(config)


def qwen2_our_fields(hf_cfg) -> dict:
    """Our fields for a Qwen2Config: q/k/v biases on every layer."""
    return dict(our_rope_rms_fields(hf_cfg), bias=False, layers=our_layers(hf_cfg, "Qwen2", qkv_bias=True))


def qwen3_check(config: LLMconfig) -> None:
    """Qwen3: Llama's layers with per-head q/k RMSNorm, no biases."""
    check_qwen(config, "Qwen3", qk_norm=True)


def qwen3_hf_fields(config: LLMconfig) -> dict:
    """Qwen3Config's arguments: the layers' head size as head_dim, no attention biases."""
    return dict(llama_like_fields(config), head_dim=head_size(config.layers[0], config), attention_bias=False)


def qwen3_our_fields(hf_cfg) -> dict:
    """Our fields for a Qwen3Config: per-head q/k RMSNorm on every layer."""
    if hf_cfg.attention_bias:
        raise ConfigError("cannot import Qwen3 with attention_bias=true: its output-projection bias has no place "
                          "here (our qkv_bias biases q, k and v only)")
    return dict(our_rope_rms_fields(hf_cfg), bias=False, layers=our_layers(hf_cfg, "Qwen3", qk_norm=True))


QKV_BIASES = (  # transformers' Qwen2 always has them: zeros for a model without --qkv_bias
    Weight("model.layers.{i}.self_attn.q_proj.bias", "blocks.{i}.attn.c_attn.bias", q_rows, zero_if_absent=True),
    Weight("model.layers.{i}.self_attn.k_proj.bias", "blocks.{i}.attn.c_attn.bias", k_rows, zero_if_absent=True),
    Weight("model.layers.{i}.self_attn.v_proj.bias", "blocks.{i}.attn.c_attn.bias", v_rows, zero_if_absent=True),
)
QK_NORMS = (
    Weight("model.layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),
    Weight("model.layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight"),
)
UNBIASED = tuple(w for w in LLAMA_LAYER_WEIGHTS if not w.theirs.endswith(".bias"))

# max_window_layers only sets the default of layer_types, which import reads
WINDOWED = LLAMA_LIKE_MAPPED | {"sliding_window", "use_sliding_window", "layer_types"}
IGNORED = frozenset({"attention_dropout", "max_window_layers"})
NO_ATTENTION_BIAS = Refusal("attention_bias", lambda c: not c.attention_bias,
                            "its bias on the output projection has no place in our qkv_bias")

QWEN2 = Family("qwen2", "Qwen2", attn=frozenset({"mha", "mqa", "gqa"}), ffn=frozenset({"dense"}),
               pos_emb=frozenset({"rope"}), check=qwen2_check, config_class="Qwen2Config", hf_fields=qwen2_hf_fields,
               our_fields=qwen2_our_fields, weights=WEIGHTS, layer_weights=UNBIASED + QKV_BIASES, windows=True,
               mapped=WINDOWED, refusals=(SILU_ONLY,), ignored=IGNORED)
QWEN3 = Family("qwen3", "Qwen3", attn=frozenset({"mha", "mqa", "gqa"}), ffn=frozenset({"dense"}),
               pos_emb=frozenset({"rope"}), check=qwen3_check, config_class="Qwen3Config", hf_fields=qwen3_hf_fields,
               our_fields=qwen3_our_fields, weights=WEIGHTS, layer_weights=UNBIASED + QK_NORMS, windows=True,
               mapped=WINDOWED | {"head_dim"}, refusals=(SILU_ONLY, NO_ATTENTION_BIAS), ignored=IGNORED)
