"""DeepseekV3 (DeepseekV3ForCausalLM): MLA with RoPE, RMSNorm, SwiGLU, no biases; dense layers first, then MoE
layers with a sigmoid router, shared experts and the aux-free selection bias (`e_score_correction_bias`)."""
import dataclasses

from ..config import BlockConfig, ConfigError, LLMconfig
from .common import (
    Family,
    Weight,
    act_name,
    gate_rows,
    hf_rope_rms_fields,
    only,
    our_rope_rms_fields,
    refuse,
    same,
    uniform,
    up_rows,
    vocab_rows,
)


def check(config: LLMconfig) -> None:
    """DeepseekV3 needs RMSNorm with eps 1e-6, SwiGLU, no biases, dense layers before MoE ones, MLA and MoE shapes
    shared by all layers, and MoE layers with a sigmoid router and at least one shared expert."""
    layers = config.layers
    acts = {act_name(b) for b in layers}
    if config.norm != "rms" or config.bias or acts != {"swiglu"}:
        refuse(f"DeepseekV3 needs RMSNorm, SwiGLU and no biases (have norm={config.norm}, bias={config.bias}, "
               f"non_linearity={sorted(acts)}); train with --norm rms --non_linearity swiglu and without --bias")
    if config.norm_eps != 1e-6:
        refuse(f"DeepseekV3 fixes the eps of its latent RMSNorms at 1e-6 while ours use norm_eps={config.norm_eps}; "
               "train with --norm_eps 1e-6")
    if any(a.ffn == "moe" and b.ffn == "dense" for a, b in zip(layers, layers[1:])):
        refuse("DeepseekV3 puts its dense layers first and MoE layers after them; reorder the layer specs")
    uniform(layers, "n_head", "kv_latent_dim", "rope_head_dim", "rope_interleave")
    same([b.q_latent_dim or None for b in layers], "q_latent_dim")
    same([head_dims(b, config) for b in layers], "(qk_nope_head_dim, v_head_dim)")
    uniform([b for b in layers if b.ffn == "dense"], "up_dim")
    moe = [b for b in layers if b.ffn == "moe"]
    if moe:
        uniform(moe, "router_score")
        if moe[0].router_score != "sigmoid":
            refuse("DeepseekV3's router uses sigmoid scores; train with --router_score sigmoid")
        uniform(moe, "n_shared", "n_exp", "n_act", "norm_topk", "routed_scaling_factor")
        same([group_limit(b) for b in moe], "(n_group, topk_group)")
        same([b.up_dim for b in moe], "up_dim of MoE layers")
        if moe[0].n_shared < 1:
            refuse("DeepseekV3 has at least one shared expert; n_shared=0, train with --n_shared 1 or more")


def head_dims(block: BlockConfig, config: LLMconfig) -> tuple[int, int]:
    """An MLA layer's (qk_nope_head_dim, v_head_dim), each n_embd // n_head when unset."""
    head = config.n_embd // block.n_head
    return block.qk_nope_head_dim or head, block.v_head_dim or head


def group_limit(block: BlockConfig) -> tuple[int, int]:
    """A MoE layer's (n_group, topk_group); (1, 1) when the groups limit nothing (topk_group = n_group)."""
    return (block.n_group, block.topk_group) if block.topk_group < block.n_group else (1, 1)


def hf_fields(config: LLMconfig) -> dict:
    """DeepseekV3Config's arguments; intermediate_size is the dense layers' width (4 * n_embd, unused, without dense
    layers)."""
    first = config.layers[0]
    nope, v = head_dims(first, config)
    dense = [b for b in config.layers if b.ffn == "dense"]
    moe = [b for b in config.layers if b.ffn == "moe"]
    fields = dict(hf_rope_rms_fields(config), num_attention_heads=first.n_head, num_key_value_heads=first.n_head,
                  q_lora_rank=first.q_latent_dim or None, kv_lora_rank=first.kv_latent_dim,
                  qk_rope_head_dim=first.rope_head_dim, qk_nope_head_dim=nope, v_head_dim=v,
                  intermediate_size=dense[0].up_dim if dense else 4 * config.n_embd, first_k_dense_replace=len(dense),
                  rope_interleave=first.rope_interleave, attention_bias=False)
    if moe:
        b = moe[0]
        n_group, topk_group = group_limit(b)
        fields.update(n_routed_experts=b.n_exp - b.n_shared, n_shared_experts=b.n_shared,
                      num_experts_per_tok=b.n_act - b.n_shared, moe_intermediate_size=b.up_dim,
                      norm_topk_prob=b.norm_topk, n_group=n_group, topk_group=topk_group,
                      routed_scaling_factor=b.routed_scaling_factor)
    return fields


def our_fields(hf_cfg) -> dict:
    """Our fields for a DeepseekV3Config: first_k_dense_replace MLA layers with a dense MLP, then MLA + MoE layers
    with a sigmoid, aux-free, group-limited router."""
    H = hf_cfg.num_attention_heads
    if hf_cfg.rms_norm_eps != 1e-6:
        raise ConfigError(f"cannot import DeepseekV3 with rms_norm_eps={hf_cfg.rms_norm_eps}: its latent norms "
                          "use 1e-6 and ours use the one norm_eps")
    L = hf_cfg.num_hidden_layers
    n_dense = min(hf_cfg.first_k_dense_replace, L)
    mla = BlockConfig(attn="mla", n_head=H, q_latent_dim=hf_cfg.q_lora_rank or 0, kv_latent_dim=hf_cfg.kv_lora_rank,
                      rope_head_dim=hf_cfg.qk_rope_head_dim, qk_nope_head_dim=hf_cfg.qk_nope_head_dim,
                      v_head_dim=hf_cfg.v_head_dim, rope_interleave=hf_cfg.rope_interleave,
                      up_dim=hf_cfg.intermediate_size, non_linearity="swiglu")
    moe = dataclasses.replace(
        mla, ffn="moe", up_dim=hf_cfg.moe_intermediate_size, n_exp=hf_cfg.n_routed_experts + hf_cfg.n_shared_experts,
        n_shared=hf_cfg.n_shared_experts, n_act=hf_cfg.num_experts_per_tok + hf_cfg.n_shared_experts,
        router_score="sigmoid", norm_topk=hf_cfg.norm_topk_prob, aux_free=True, n_group=hf_cfg.n_group,
        topk_group=hf_cfg.topk_group, routed_scaling_factor=float(hf_cfg.routed_scaling_factor))
    return dict(our_rope_rms_fields(hf_cfg), bias=False, layers=[mla] * n_dense + [moe] * (L - n_dense))


WEIGHTS = (
    Weight("model.embed_tokens.weight", "tok_emb.weight", vocab_rows),
    Weight("model.norm.weight", "ln_f.weight"),
    Weight("lm_head.weight", "lm_head.weight", vocab_rows),
)
LAYER_WEIGHTS = (  # attention with or without a query latent; a dense MLP or a MoE layer
    Weight("model.layers.{i}.input_layernorm.weight", "blocks.{i}.ln_1.weight"),
    Weight("model.layers.{i}.self_attn.q_a_proj.weight", "blocks.{i}.attn.q_proj.0.weight"),
    Weight("model.layers.{i}.self_attn.q_a_layernorm.weight", "blocks.{i}.attn.q_proj.1.weight"),
    Weight("model.layers.{i}.self_attn.q_b_proj.weight", "blocks.{i}.attn.q_proj.2.weight"),
    Weight("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.q_proj.weight"),
    Weight("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "blocks.{i}.attn.kv_down.weight"),
    Weight("model.layers.{i}.self_attn.kv_a_layernorm.weight", "blocks.{i}.attn.kv_norm.weight"),
    Weight("model.layers.{i}.self_attn.kv_b_proj.weight", "blocks.{i}.attn.kv_up.weight"),
    Weight("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.c_proj.weight"),
    Weight("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln_2.weight"),
    Weight("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.ffn.c_fc.weight", gate_rows),
    Weight("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.ffn.c_fc.weight", up_rows),
    Weight("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.ffn.c_proj.weight"),
    Weight("model.layers.{i}.mlp.gate.weight", "blocks.{i}.ffn.router.gate.weight"),
    Weight("model.layers.{i}.mlp.gate.e_score_correction_bias", "blocks.{i}.ffn.router.expert_bias",
           zero_if_absent=True),
    Weight("model.layers.{i}.mlp.experts.gate_up_proj", "blocks.{i}.ffn.experts.c_fc.weight"),
    Weight("model.layers.{i}.mlp.experts.down_proj", "blocks.{i}.ffn.experts.c_proj.weight"),
    Weight("model.layers.{i}.mlp.shared_experts.gate_proj.weight", "blocks.{i}.ffn.shared.c_fc.weight", gate_rows),
    Weight("model.layers.{i}.mlp.shared_experts.up_proj.weight", "blocks.{i}.ffn.shared.c_fc.weight", up_rows),
    Weight("model.layers.{i}.mlp.shared_experts.down_proj.weight", "blocks.{i}.ffn.shared.c_proj.weight"),
)

MAPPED = frozenset({
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
    "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
    "norm_topk_prob", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_interleave",
})
REFUSALS = (
    only("hidden_act", "silu", "our gated MLP is SwiGLU (silu)"),
    only("attention_bias", False, "our MLA projections have no biases"),
)
IGNORED = frozenset({
    "num_key_value_heads",  # MLA has none; transformers' DeepseekV3 does not read it
    "num_mtp_layers",  # multi-token prediction modules are not part of DeepseekV3ForCausalLM
    "output_router_logits", "attention_dropout", "pretraining_tp",  # outputs; dropout in training; unused
})

DEEPSEEK_V3 = Family("deepseek_v3", "DeepseekV3", attn=frozenset({"mla"}), ffn=frozenset({"dense", "moe"}),
                     pos_emb=frozenset({"rope"}), check=check, config_class="DeepseekV3Config", hf_fields=hf_fields,
                     our_fields=our_fields, weights=WEIGHTS, layer_weights=LAYER_WEIGHTS, mapped=MAPPED,
                     refusals=REFUSALS, ignored=IGNORED)
