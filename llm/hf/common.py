"""What a transformers family declares (`Family`) and the pieces the families share: weight-map entries (`Weight`)
with their layout transforms, the check that all layers agree, refusals, and applying a map to our model."""
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..config import ACTIVATION_ALIASES, BlockConfig, ConfigError, LLMconfig
from ..model import LLM

Transform = Callable[[torch.Tensor, LLMconfig, BlockConfig | None], torch.Tensor]
"""Our tensor, the model config and the layer's spec (None for model-wide tensors) -> a view of the tensor in
transformers' layout."""


def as_is(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig | None) -> torch.Tensor:
    """The same layout on both sides."""
    return tensor


def transposed(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig | None) -> torch.Tensor:
    """GPT-2's Conv1D stores (in, out) where our Linear stores (out, in)."""
    return tensor.T  # (in, out)


def vocab_rows(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig | None) -> torch.Tensor:
    """Embedding or output-head rows without our padding beyond vocab_size."""
    return tensor[: config.vocab_size]  # (vocab_size, C)


def gate_rows(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig | None) -> torch.Tensor:
    """The gate half of our fused [gate | up] projection (weight or bias)."""
    return tensor.chunk(2)[0]  # (up_dim, C) or (up_dim,)


def up_rows(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig | None) -> torch.Tensor:
    """The up half of our fused [gate | up] projection (weight or bias)."""
    return tensor.chunk(2)[1]  # (up_dim, C) or (up_dim,)


@dataclass(frozen=True)
class Weight:
    """One entry of a weight map: a transformers tensor name and the name of our tensor it is a view of.

    In per-layer entries "{i}" stands for the layer index. An entry applies where our model has the tensor `ours`,
    so bias entries apply only to models with biases, and a layer's MLA or MoE entries only to such layers.
    `transform` gives our tensor in transformers' layout as a view: export reads it, import copies into it in place.
    With `zero_if_absent` transformers always has the tensor: where our module exists but has no such tensor (no
    bias, no selection bias), export writes zeros and import skips it.
    """

    theirs: str
    ours: str
    transform: Transform = as_is
    zero_if_absent: bool = False


@dataclass(frozen=True)
class Refusal:
    """A transformers config field that we represent at some values only: import refuses the others, naming the
    field, its value and `reason`."""

    field: str
    accepts: Callable[[object], bool]  # the transformers config -> whether we represent its value of `field`
    reason: str


MAPPED_EVERYWHERE = frozenset({"vocab_size", "tie_word_embeddings"})
"""Fields that every import reads (llm/hf/__init__.py's config_from_hf)."""
IGNORED_EVERYWHERE = frozenset({
    "transformers_version", "architectures", "dtype", "problem_type", "id2label", "label2id",  # metadata
    "output_hidden_states", "return_dict", "use_cache", "chunk_size_feed_forward",  # what forward returns, how
    "is_encoder_decoder",  # the base class's flag; the families here are decoder-only causal LMs
    "bos_token_id", "eos_token_id", "pad_token_id",  # the tokenizer's business
    "initializer_range",  # initialisation only; imported weights replace it
})
"""transformers config fields that do not change a causal LM's function, in every family."""


@dataclass(frozen=True)
class Family:
    """A transformers model family that our models convert to and from (one file in llm/hf/, one registry line).

    - `model_type`: transformers' name for it (config.json's model_type), the registry key.
    - `title`: its name in messages ("GPT-2").
    - `attn`, `ffn`, `pos_emb`: the values of these config fields it represents. A model exports to the first
      registered family whose sets hold all its layers' mixer and feed-forward kinds and its pos_emb.
    - `check(config)`: refuses what else the family cannot represent, with `refuse(...)` ("cannot export: ...");
      once it passes, `hf_fields` may read any layer for the fields it checked to agree.
    - `config_class`: the transformers configuration class, by name (transformers is imported only by
      llm/hf/__init__.py).
    - `hf_fields(config)`: that class's arguments for our config, beyond vocab_size, tie_word_embeddings and the
      bos/eos token ids.
    - `our_fields(hf_cfg)`: our LLMconfig fields, unresolved layers included, for its configuration, beyond
      vocab_size and tie_embeddings; refuses what we cannot represent with ConfigError("cannot import ...").
    - `weights`, `layer_weights`: the weight map, model-wide entries and per-layer entries ("{i}").
    - `windows`: whether it represents sliding-window layers (BlockConfig.window); `check` refuses the patterns
      of windows it cannot represent.
    - `mapped`, `refusals`, `ignored`: every field of `config_class` besides MAPPED_EVERYWHERE and
      IGNORED_EVERYWHERE is in exactly one of them (tests/test_hf.py walks the class): read by `our_fields`,
      represented at some values only (import refuses the others), or without effect on the logits.
    """

    model_type: str
    title: str
    attn: frozenset[str]
    ffn: frozenset[str]
    pos_emb: frozenset[str]
    check: Callable[[LLMconfig], None]
    config_class: str
    hf_fields: Callable[[LLMconfig], dict]
    our_fields: Callable[[object], dict]
    weights: tuple[Weight, ...]
    layer_weights: tuple[Weight, ...]
    windows: bool = False
    mapped: frozenset[str] = frozenset()
    refusals: tuple[Refusal, ...] = ()
    ignored: frozenset[str] = frozenset()


def only(field: str, value: object, reason: str) -> Refusal:
    """A Refusal of every value of `field` but `value`."""
    return Refusal(field, lambda hf_cfg: getattr(hf_cfg, field) == value, reason)


def refuse(feature: str) -> None:
    """Refuses an export, naming the feature that blocks it and, where there is one, the fix."""
    raise ConfigError(f"cannot export: {feature}")


def same(values: list, feature: str) -> None:
    """Refuses unless every layer has the same value (transformers models use one value for all layers)."""
    if any(v != values[0] for v in values):
        refuse(f"layers differ in {feature} ({sorted(set(map(str, values)))}); "
               "transformers models use one value for all layers")


def uniform(layers: list[BlockConfig], *fields: str) -> None:
    """Refuses unless all `layers` agree in each of the named BlockConfig fields."""
    for field in fields:
        same([getattr(b, field) for b in layers], field)


def act_name(block: BlockConfig) -> str:
    """The layer's activation with aliases resolved (swish -> silu)."""
    return ACTIVATION_ALIASES.get(block.non_linearity, block.non_linearity)


def hf_rope_rms_fields(config: LLMconfig) -> dict:
    """The transformers fields of a Llama-style decoder (RoPE, RMSNorm, SiLU gates) that mean what ours do."""
    return dict(hidden_size=config.n_embd, num_hidden_layers=config.n_layer, max_position_embeddings=config.block_size,
                rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_scaling=hf_rope_scaling(config),
                hidden_act="silu")


def hf_rope_scaling(config: LLMconfig) -> dict | None:
    """transformers' rope_scaling dict (rope_parameters from transformers 5 on) of our RoPE scaling; None without."""
    kind = config.rope_scaling
    if kind == "none":
        return None
    params = dict(rope_type=kind, factor=config.rope_factor)
    if kind in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = config.rope_original_max_position_embeddings or config.block_size
    if kind == "llama3":
        params.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor)
    if kind == "yarn":
        params.update(beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow)
        optional = dict(mscale=config.rope_mscale, mscale_all_dim=config.rope_mscale_all_dim,
                        attention_factor=config.rope_attention_factor)
        params.update({name: value for name, value in optional.items() if value is not None})
    return params


ROPE_KEYS = {  # transformers' rope_parameters keys per rope_type -> our LLMconfig field
    "default": {},
    "linear": {"factor": "rope_factor"},
    "llama3": {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_position_embeddings",
               "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor"},
    "yarn": {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_position_embeddings",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "mscale": "rope_mscale",
             "mscale_all_dim": "rope_mscale_all_dim", "attention_factor": "rope_attention_factor"},
}


def our_rope_fields(hf_cfg) -> dict:
    """Our pos_emb, rope_theta and RoPE scaling fields of a transformers config's rope_parameters (transformers 5) or
    rope_theta and rope_scaling (earlier); refuses a rope type, key or value we do not represent, naming it."""
    params = dict(getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", getattr(hf_cfg, "rope_theta", 1e4))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_KEYS:
        raise ConfigError(f"cannot import rope_type={kind!r}: supported RoPE scalings are {', '.join(ROPE_KEYS)}")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("cannot import partial_rotary_factor != 1: our RoPE rotates the whole head")
    if not params.pop("truncate", True):
        raise ConfigError("cannot import rope_type=yarn with truncate=false: ours rounds the ramp's ends (truncate)")
    unknown = sorted(set(params) - set(ROPE_KEYS[kind]))
    if unknown:
        raise ConfigError(f"cannot import rope_parameters key {unknown[0]!r} of rope_type={kind}: not represented")
    if kind == "yarn" and params.get("factor") is None:  # transformers' yarn: the ratio of the two lengths
        params["factor"] = hf_cfg.max_position_embeddings / params["original_max_position_embeddings"]
    fields = dict(pos_emb="rope", rope_theta=float(theta), rope_scaling="none" if kind == "default" else kind)
    fields.update({ROPE_KEYS[kind][key]: value for key, value in params.items() if value is not None})
    return fields


def our_rope_rms_fields(hf_cfg) -> dict:
    """Our fields of a Llama-style transformers configuration: RoPE with its theta and scaling, RMSNorm with its
    eps."""
    return dict(our_rope_fields(hf_cfg), block_size=hf_cfg.max_position_embeddings, n_embd=hf_cfg.hidden_size,
                n_layer=hf_cfg.num_hidden_layers, norm="rms", norm_eps=hf_cfg.rms_norm_eps)


class Pair(NamedTuple):
    """A weight-map entry applied to one model."""

    theirs: str  # the transformers tensor name
    ours: str  # our tensor name
    tensor: torch.Tensor | None  # a view of our tensor in transformers' layout; None: transformers' is zero


def saved_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and saved buffers by name, a tied weight once (under its first name)."""
    saved = module.state_dict(keep_vars=True)
    return {name: t for name, t in [*module.named_parameters(), *module.named_buffers()] if name in saved}


def weight_pairs(model: LLM, family: Family) -> list[Pair]:
    """The family's weight map applied to our model: its model-wide entries, then its layer entries for each layer,
    each where it applies. Raises RuntimeError if one of our tensors is left out (the map is incomplete); the
    multi-token prediction modules (`mtp.*`, training-only) are never mapped."""
    ours, modules = saved_tensors(model), dict(model.named_modules())
    entries = [(w, None) for w in family.weights]
    entries += [(w, i) for i in range(len(model.config.layers)) for w in family.layer_weights]
    pairs = []
    for weight, i in entries:
        theirs, name = weight.theirs.format(i=i), weight.ours.format(i=i)
        layer = None if i is None else model.config.layers[i]
        if name in ours:
            pairs.append(Pair(theirs, name, weight.transform(ours[name], model.config, layer)))
        elif weight.zero_if_absent and name.rpartition(".")[0] in modules:
            pairs.append(Pair(theirs, name, None))
    training_only = {name for name in ours if name.startswith("mtp.")}  # multi-token prediction: never exported
    left_out = sorted(set(ours) - training_only - {p.ours for p in pairs})
    if left_out:
        raise RuntimeError(f"the {family.title} weight map leaves out our tensors {left_out[:5]}")
    return pairs


def copy_weight(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    """target.copy_(source) in place, refusing different shapes (which copy_ could broadcast)."""
    if target.shape != source.shape:
        raise ConfigError(f"weight {name} has shape {tuple(source.shape)} where {tuple(target.shape)} is expected")
    target.copy_(source)


def our_head_dim(hf_cfg) -> int | None:
    """Our head_dim of a transformers config's head_dim: unset (n_embd // n_head) when its heads are hidden_size /
    num_attention_heads wide or it has no head_dim."""
    head_dim = getattr(hf_cfg, "head_dim", None)
    return None if head_dim is None or head_dim * hf_cfg.num_attention_heads == hf_cfg.hidden_size else head_dim


def llama_like_layer(hf_cfg, title: str, **fields) -> BlockConfig:
    """The layer of a Llama-like transformers decoder (mha, mqa or gqa by its key/value heads, SwiGLU, its head_dim):
    refuses an activation other than SiLU (RoPE scaling maps through our_rope_rms_fields)."""
    H, kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    if hf_cfg.hidden_act != "silu":
        raise ConfigError(f"cannot import {title} with hidden_act={hf_cfg.hidden_act!r}: its gated MLP maps to our "
                          "swiglu (silu) only")
    attn = "mha" if kv == H else "mqa" if kv == 1 else "gqa"
    return BlockConfig(attn=attn, n_head=H, n_kv_heads=kv, head_dim=our_head_dim(hf_cfg), up_dim=hf_cfg.intermediate_size,
                       non_linearity="swiglu", **fields)


LLAMA_LIKE_MAPPED = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters"})
SILU_ONLY = Refusal("hidden_act", lambda c: c.hidden_act == "silu", "our gated MLP is SwiGLU (silu)")
