"""Llama (LlamaForCausalLM): MHA, MQA or GQA with RoPE, RMSNorm and SwiGLU, with or without biases."""
import torch

from ..config import BlockConfig, ConfigError, LLMconfig
from ..model.mixers.gqa import head_size, kv_heads
from .common import (
    SILU_ONLY,
    Family,
    Weight,
    act_name,
    gate_rows,
    hf_rope_rms_fields,
    our_head_dim,
    our_rope_rms_fields,
    refuse,
    same,
    uniform,
    up_rows,
    vocab_rows,
)


def check(config: LLMconfig) -> None:
    """Llama needs RMSNorm and SwiGLU, one head count, head size, key/value head count and width for all layers, and
    neither q/k/v-only biases (Qwen2) nor per-head q/k norms (Qwen3)."""
    acts = {act_name(b) for b in config.layers}
    if config.norm != "rms" or acts != {"swiglu"}:
        refuse(f"RoPE models export as Llama, which needs RMSNorm and SwiGLU (have norm={config.norm}, "
               f"non_linearity={sorted(acts)}); train with --norm rms --non_linearity swiglu")
    uniform(config.layers, "n_head", "up_dim")
    same([kv_heads(b) for b in config.layers], "key/value heads")
    same([head_size(b, config) for b in config.layers], "head size (head_dim)")
    if config.n_embd % config.layers[0].n_head:
        refuse(f"transformers needs hidden_size to be a multiple of num_attention_heads, even with head_dim "
               f"(n_embd={config.n_embd}, n_head={config.layers[0].n_head})")
    if any(b.qkv_bias and not config.bias for b in config.layers):
        refuse("Llama's attention_bias biases the output projection too, not q/k/v only (qkv_bias, Qwen2)")
    if any(b.qk_norm for b in config.layers):
        refuse("Llama has no per-head q/k RMSNorm (qk_norm, Qwen3)")


def hf_fields(config: LLMconfig) -> dict:
    """LlamaConfig's arguments for our config; our one bias flag covers attention and MLP."""
    block = config.layers[0]
    return dict(hf_rope_rms_fields(config), num_attention_heads=block.n_head, num_key_value_heads=kv_heads(block),
                head_dim=head_size(block, config), intermediate_size=block.up_dim, attention_bias=config.bias,
                mlp_bias=config.bias)


def our_fields(hf_cfg) -> dict:
    """Our fields for a LlamaConfig: mha, mqa or gqa by its key/value head count."""
    if hf_cfg.attention_bias != hf_cfg.mlp_bias:
        raise ConfigError("cannot import Llama with attention_bias != mlp_bias; our bias flag covers both")
    H, kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    attn = "mha" if kv == H else "mqa" if kv == 1 else "gqa"
    block = BlockConfig(attn=attn, n_head=H, n_kv_heads=kv, head_dim=our_head_dim(hf_cfg),
                        up_dim=hf_cfg.intermediate_size, non_linearity="swiglu")
    return dict(our_rope_rms_fields(hf_cfg), bias=hf_cfg.attention_bias, layers=[block] * hf_cfg.num_hidden_layers)


def qkv_sizes(config: LLMconfig, layer: BlockConfig) -> list[int]:
    """Rows of q, k and v in our fused c_attn: n_head, then n_kv and n_kv heads of the layer's head size."""
    head = head_size(layer, config)
    return [layer.n_head * head, kv_heads(layer) * head, kv_heads(layer) * head]


def q_rows(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig) -> torch.Tensor:
    """The query rows of our fused c_attn (weight or bias)."""
    return tensor.split(qkv_sizes(config, layer))[0]  # (n_head * head, C) or (n_head * head,)


def k_rows(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig) -> torch.Tensor:
    """The key rows of our fused c_attn (weight or bias)."""
    return tensor.split(qkv_sizes(config, layer))[1]  # (n_kv * head, C) or (n_kv * head,)


def v_rows(tensor: torch.Tensor, config: LLMconfig, layer: BlockConfig) -> torch.Tensor:
    """The value rows of our fused c_attn (weight or bias)."""
    return tensor.split(qkv_sizes(config, layer))[2]  # (n_kv * head, C) or (n_kv * head,)


WEIGHTS = (
    Weight("model.embed_tokens.weight", "tok_emb.weight", vocab_rows),
    Weight("model.norm.weight", "ln_f.weight"),
    Weight("lm_head.weight", "lm_head.weight", vocab_rows),
)
LAYER_WEIGHTS = (  # bias entries apply to models with --bias
    Weight("model.layers.{i}.input_layernorm.weight", "blocks.{i}.ln_1.weight"),
    Weight("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.c_attn.weight", q_rows),
    Weight("model.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.c_attn.weight", k_rows),
    Weight("model.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.c_attn.weight", v_rows),
    Weight("model.layers.{i}.self_attn.q_proj.bias", "blocks.{i}.attn.c_attn.bias", q_rows),
    Weight("model.layers.{i}.self_attn.k_proj.bias", "blocks.{i}.attn.c_attn.bias", k_rows),
    Weight("model.layers.{i}.self_attn.v_proj.bias", "blocks.{i}.attn.c_attn.bias", v_rows),
    Weight("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.c_proj.weight"),
    Weight("model.layers.{i}.self_attn.o_proj.bias", "blocks.{i}.attn.c_proj.bias"),
    Weight("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln_2.weight"),
    Weight("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.ffn.c_fc.weight", gate_rows),
    Weight("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.ffn.c_fc.weight", up_rows),
    Weight("model.layers.{i}.mlp.gate_proj.bias", "blocks.{i}.ffn.c_fc.bias", gate_rows),
    Weight("model.layers.{i}.mlp.up_proj.bias", "blocks.{i}.ffn.c_fc.bias", up_rows),
    Weight("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.ffn.c_proj.weight"),
    Weight("model.layers.{i}.mlp.down_proj.bias", "blocks.{i}.ffn.c_proj.bias"),
)

MAPPED = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                    "attention_bias", "mlp_bias", "head_dim"})
REFUSALS = (SILU_ONLY,)
IGNORED = frozenset({"attention_dropout", "pretraining_tp"})  # dropout: training only; pretraining_tp: unused

LLAMA = Family("llama", "Llama", attn=frozenset({"mha", "mqa", "gqa"}), ffn=frozenset({"dense"}),
               pos_emb=frozenset({"rope"}), check=check, config_class="LlamaConfig", hf_fields=hf_fields,
               our_fields=our_fields, weights=WEIGHTS, layer_weights=LAYER_WEIGHTS, mapped=MAPPED,
               refusals=REFUSALS, ignored=IGNORED)
