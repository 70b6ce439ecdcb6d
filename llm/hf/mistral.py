"""Mistral (MistralForCausalLM): Llama's layers with one sliding window for all layers (or none)."""
import dataclasses

from ..config import LLMconfig
from ..model.mixers.gqa import head_size, kv_heads
from .common import (
    LLAMA_LIKE_MAPPED,
    SILU_ONLY,
    Family,
    hf_rope_rms_fields,
    llama_like_layer,
    our_rope_rms_fields,
    refuse,
    same,
)
from .llama import LAYER_WEIGHTS, WEIGHTS
from .llama import check as llama_check


def check(config: LLMconfig) -> None:
    """Llama's requirements, no biases, and one sliding window shared by every layer (or none)."""
    llama_check(config)
    if config.bias:
        refuse("Mistral has no biases; train without --bias")
    same([b.window for b in config.layers], "window (Mistral's sliding_window is one for all layers)")


def hf_fields(config: LLMconfig) -> dict:
    """MistralConfig's arguments: Llama's, the layers' head size as head_dim, and sliding_window = our window."""
    block = config.layers[0]
    return dict(hf_rope_rms_fields(config), num_attention_heads=block.n_head, num_key_value_heads=kv_heads(block),
                head_dim=head_size(block, config), intermediate_size=block.up_dim,
                sliding_window=block.window)


def our_fields(hf_cfg) -> dict:
    """Our fields for a MistralConfig: every layer windowed by sliding_window (None: full attention)."""
    block = llama_like_layer(hf_cfg, "Mistral")
    block = dataclasses.replace(block, window=hf_cfg.sliding_window)
    return dict(our_rope_rms_fields(hf_cfg), bias=False, layers=[block] * hf_cfg.num_hidden_layers)


MAPPED = LLAMA_LIKE_MAPPED | {"sliding_window", "head_dim"}
REFUSALS = (SILU_ONLY,)

MISTRAL = Family("mistral", "Mistral", attn=frozenset({"mha", "mqa", "gqa"}), ffn=frozenset({"dense"}),
                 pos_emb=frozenset({"rope"}), check=check, config_class="MistralConfig", hf_fields=hf_fields,
                 our_fields=our_fields, weights=WEIGHTS, layer_weights=LAYER_WEIGHTS, windows=True, mapped=MAPPED,
                 refusals=REFUSALS, ignored=frozenset({"attention_dropout"}))
