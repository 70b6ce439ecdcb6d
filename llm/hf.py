"""Conversion to and from Hugging Face transformers: GPT2LMHeadModel, LlamaForCausalLM and DeepseekV3ForCausalLM.

A model is exported to the one family whose configuration fields mean what ours do; anything none of them can
represent is refused with the feature that blocks it. transformers is imported only here (pip install 'llm[hf]').
"""
import dataclasses

import torch

from .config import ACTIVATION_ALIASES, BlockConfig, ConfigError, LLMconfig, resolve_block, validate_model
from .model import LLM
from .model.ffn.moe import MoE
from .model.mixers.gqa import kv_heads

GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "tanh": "tanh"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face export and import need transformers: pip install 'llm[hf]'") from None
    return transformers


def _same(values: list, feature: str) -> object:
    """The one value every layer has, or a refusal naming the feature that differs."""
    if any(v != values[0] for v in values):
        raise ConfigError(f"cannot export: layers differ in {feature} ({sorted(set(map(str, values)))}); "
                          "transformers models use one value for all layers")
    return values[0]


def _refuse(feature: str) -> None:
    raise ConfigError(f"cannot export: {feature}")


def family(config: LLMconfig) -> str:
    """gpt2, llama or deepseek_v3: the transformers family that represents this model exactly."""
    kinds = {b.attn for b in config.layers}
    if "mla" in kinds and len(kinds) > 1:
        _refuse(f"the layers mix attention kinds ({', '.join(sorted(kinds))}); no transformers model does")
    acts = {ACTIVATION_ALIASES.get(b.non_linearity, b.non_linearity) for b in config.layers}
    if kinds == {"mla"}:
        if config.pos_emb != "rope" or config.norm != "rms" or config.bias or acts != {"swiglu"}:
            _refuse("DeepseekV3 needs RoPE, RMSNorm, SwiGLU and no biases (have pos_emb="
                    f"{config.pos_emb}, norm={config.norm}, bias={config.bias}, non_linearity={sorted(acts)})")
        if config.norm_eps != 1e-6:
            _refuse(f"DeepseekV3 fixes the eps of its latent RMSNorms at 1e-6 while ours use norm_eps={config.norm_eps}; "
                    "train with --norm_eps 1e-6")
        return "deepseek_v3"
    if any(b.ffn == "moe" for b in config.layers):
        _refuse("Mixture-of-Experts layers export only with MLA attention (DeepseekV3)")
    if config.pos_emb == "learn":
        if kinds != {"mha"} or config.norm != "layer" or not acts <= set(GPT2_ACTIVATIONS):
            _refuse("learned positions export as GPT-2, which needs MHA, LayerNorm and one of the activations "
                    f"{', '.join(GPT2_ACTIVATIONS)} (have attn={sorted(kinds)}, norm={config.norm}, "
                    f"non_linearity={sorted(acts)})")
        return "gpt2"
    if config.pos_emb == "rope":
        if config.norm != "rms" or acts != {"swiglu"}:
            _refuse(f"RoPE models export as Llama, which needs RMSNorm and SwiGLU (have norm={config.norm}, "
                    f"non_linearity={sorted(acts)})")
        return "llama"
    _refuse("sinusoidal positions; no transformers causal LM uses them")


def hf_config(config: LLMconfig, eot: int | None = None):
    """The transformers configuration of our model; eot becomes its bos and eos token id."""
    t, layers = _transformers(), config.layers
    kind = family(config)
    n_head = _same([b.n_head for b in layers], "n_head")
    common = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                  num_attention_heads=n_head, tie_word_embeddings=config.tie_embeddings, bos_token_id=eot,
                  eos_token_id=eot)
    if kind == "gpt2":
        act = _same([ACTIVATION_ALIASES.get(b.non_linearity, b.non_linearity) for b in layers], "non_linearity")
        return t.GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                            n_layer=config.n_layer, n_head=n_head, n_inner=_same([b.up_dim for b in layers], "up_dim"),
                            activation_function=GPT2_ACTIVATIONS[act], layer_norm_epsilon=config.norm_eps,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            tie_word_embeddings=config.tie_embeddings, bos_token_id=eot, eos_token_id=eot)
    if kind == "llama":
        kv = _same([kv_heads(b) for b in layers], "key/value heads")
        return t.LlamaConfig(**common, num_key_value_heads=kv, intermediate_size=_same([b.up_dim for b in layers],
                             "up_dim"), max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                             rope_theta=config.rope_theta, attention_bias=config.bias, mlp_bias=config.bias,
                             hidden_act="silu")
    dense = [b for b in layers if b.ffn != "moe"]
    moe = [b for b in layers if b.ffn == "moe"]
    if any(b.ffn == "moe" for b in layers[: len(dense)]) or (moe and layers[-1].ffn != "moe"):
        _refuse("DeepseekV3 puts its dense layers first and MoE layers after them")
    mla = dict(q_lora_rank=_same([b.q_latent_dim or None for b in layers], "q_latent_dim"),
               kv_lora_rank=_same([b.kv_latent_dim for b in layers], "kv_latent_dim"),
               qk_rope_head_dim=_same([b.rope_head_dim for b in layers], "rope_head_dim"),
               qk_nope_head_dim=config.n_embd // n_head, v_head_dim=config.n_embd // n_head)
    moe_fields = {}
    if moe:
        if _same([b.router_score for b in moe], "router_score") != "sigmoid":
            _refuse("DeepseekV3's router uses sigmoid scores; train with --router_score sigmoid")
        n_shared = _same([b.n_shared for b in moe], "n_shared")
        if n_shared < 1:
            _refuse("DeepseekV3 has at least one shared expert; n_shared=0")
        moe_fields = dict(n_routed_experts=_same([b.n_exp for b in moe], "n_exp") - n_shared,
                          n_shared_experts=n_shared, num_experts_per_tok=_same([b.n_act for b in moe], "n_act") - n_shared,
                          moe_intermediate_size=_same([b.up_dim for b in moe], "up_dim of MoE layers"),
                          norm_topk_prob=_same([b.norm_topk for b in moe], "norm_topk"), n_group=1, topk_group=1,
                          routed_scaling_factor=1.0)
    return t.DeepseekV3Config(**common, num_key_value_heads=n_head, **mla, **moe_fields,
                              intermediate_size=_same([b.up_dim for b in dense], "up_dim") if dense else 4 * config.n_embd,
                              first_k_dense_replace=len(dense), max_position_embeddings=config.block_size,
                              rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_interleave=False,
                              attention_bias=False, hidden_act="silu")


def _layer_pairs(kind: str, block, i: int) -> list[tuple[str, torch.Tensor]]:
    """(transformers name, tensor in transformers' layout) for one of our blocks."""
    pairs = []
    if kind == "gpt2":
        p = f"transformer.h.{i}."
        for ours, theirs in ((block.ln_1, "ln_1"), (block.ln_2, "ln_2")):
            pairs += [(p + theirs + ".weight", ours.weight), (p + theirs + ".bias", _bias(ours, ours.weight.shape[0]))]
        for ours, theirs in ((block.attn.c_attn, "attn.c_attn"), (block.attn.c_proj, "attn.c_proj"),
                             (block.ffn.c_fc, "mlp.c_fc"), (block.ffn.c_proj, "mlp.c_proj")):
            pairs += [(p + theirs + ".weight", ours.weight.T), (p + theirs + ".bias", _bias(ours, ours.weight.shape[0]))]
        return pairs
    p = f"model.layers.{i}."
    pairs += [(p + "input_layernorm.weight", block.ln_1.weight), (p + "post_attention_layernorm.weight", block.ln_2.weight)]
    attn = block.attn
    if kind == "llama":
        hs = attn.head_size
        sizes = [attn.n_head * hs, attn.n_kv * hs, attn.n_kv * hs]
        for name, w in zip(("q_proj", "k_proj", "v_proj"), attn.c_attn.weight.split(sizes)):
            pairs.append((p + f"self_attn.{name}.weight", w))
        if attn.c_attn.bias is not None:
            for name, b in zip(("q_proj", "k_proj", "v_proj"), attn.c_attn.bias.split(sizes)):
                pairs.append((p + f"self_attn.{name}.bias", b))
        pairs += _linear(p + "self_attn.o_proj", attn.c_proj)
    else:
        if isinstance(attn.q_proj, torch.nn.Sequential):
            pairs += [(p + "self_attn.q_a_proj.weight", attn.q_proj[0].weight),
                      (p + "self_attn.q_a_layernorm.weight", attn.q_proj[1].weight),
                      (p + "self_attn.q_b_proj.weight", attn.q_proj[2].weight)]
        else:
            pairs.append((p + "self_attn.q_proj.weight", attn.q_proj.weight))
        pairs += [(p + "self_attn.kv_a_proj_with_mqa.weight", attn.kv_down.weight),
                  (p + "self_attn.kv_a_layernorm.weight", attn.kv_norm.weight),
                  (p + "self_attn.kv_b_proj.weight", attn.kv_up.weight), (p + "self_attn.o_proj.weight", attn.c_proj.weight)]
    if isinstance(block.ffn, MoE):
        moe = block.ffn
        gate, up = moe.shared.c_fc.weight.chunk(2)
        bias = moe.router.expert_bias if moe.router.expert_bias is not None else torch.zeros(moe.router.n_routed)
        return pairs + [(p + "mlp.gate.weight", moe.router.gate.weight), (p + "mlp.gate.e_score_correction_bias", bias),
                        (p + "mlp.experts.gate_up_proj", moe.experts.c_fc.weight),
                        (p + "mlp.experts.down_proj", moe.experts.c_proj.weight),
                        (p + "mlp.shared_experts.gate_proj.weight", gate), (p + "mlp.shared_experts.up_proj.weight", up),
                        (p + "mlp.shared_experts.down_proj.weight", moe.shared.c_proj.weight)]
    gate, up = block.ffn.c_fc.weight.chunk(2)
    pairs += [(p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up)]
    pairs += _linear(p + "mlp.down_proj", block.ffn.c_proj)
    if block.ffn.c_fc.bias is not None:
        gate_bias, up_bias = block.ffn.c_fc.bias.chunk(2)
        pairs += [(p + "mlp.gate_proj.bias", gate_bias), (p + "mlp.up_proj.bias", up_bias)]
    return pairs


def _bias(module, size: int) -> torch.Tensor:
    """The module's bias, or zeros where we have none (GPT-2 always has biases)."""
    return module.bias if module.bias is not None else torch.zeros(size)


def _linear(name: str, linear) -> list[tuple[str, torch.Tensor]]:
    return [(name + ".weight", linear.weight)] + ([(name + ".bias", linear.bias)] if linear.bias is not None else [])


def name_pairs(model: LLM, kind: str) -> list[tuple[str, torch.Tensor]]:
    """Every transformers weight name with our tensor for it, in transformers' layout."""
    V = model.config.vocab_size
    if kind == "gpt2":
        pairs = [("transformer.wte.weight", model.tok_emb.weight[:V]), ("transformer.wpe.weight", model.pos_emb.table.weight),
                 ("transformer.ln_f.weight", model.ln_f.weight),
                 ("transformer.ln_f.bias", _bias(model.ln_f, model.config.n_embd))]
    else:
        pairs = [("model.embed_tokens.weight", model.tok_emb.weight[:V]), ("model.norm.weight", model.ln_f.weight)]
    for i, block in enumerate(model.blocks):
        pairs += _layer_pairs(kind, block, i)
    if not model.config.tie_embeddings:
        pairs.append(("lm_head.weight", model.lm_head.weight[:V]))
    return pairs


def to_hf(model: LLM, eot: int | None = None):
    """A transformers model equal to ours (fp32), built from its config with our weights copied in."""
    config = hf_config(model.config, eot)
    hf = _transformers().AutoModelForCausalLM.from_config(config).float()
    weights = {name: tensor.detach().float().contiguous() for name, tensor in name_pairs(model, family(model.config))}
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf


def config_from_hf(hf_cfg) -> LLMconfig:
    """Our configuration of a transformers GPT-2, Llama or DeepseekV3 configuration."""
    kind = hf_cfg.model_type
    if kind == "gpt2":
        act = {v: k for k, v in GPT2_ACTIVATIONS.items()}.get(hf_cfg.activation_function)
        if act is None:
            raise ConfigError(f"cannot import GPT-2 with activation {hf_cfg.activation_function!r}")
        block = BlockConfig(attn="mha", n_head=hf_cfg.n_head, up_dim=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
                            non_linearity=act)
        config = LLMconfig(vocab_size=hf_cfg.vocab_size, block_size=hf_cfg.n_positions, n_embd=hf_cfg.n_embd,
                           n_layer=hf_cfg.n_layer, pos_emb="learn", norm="layer", norm_eps=hf_cfg.layer_norm_epsilon,
                           bias=True, tie_embeddings=hf_cfg.tie_word_embeddings, layers=[block] * hf_cfg.n_layer)
    elif kind in ("llama", "deepseek_v3"):
        rope_theta = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(hf_cfg, "rope_theta", 1e4))
        common = dict(vocab_size=hf_cfg.vocab_size, block_size=hf_cfg.max_position_embeddings, n_embd=hf_cfg.hidden_size,
                      n_layer=hf_cfg.num_hidden_layers, pos_emb="rope", rope_theta=float(rope_theta), norm="rms",
                      norm_eps=hf_cfg.rms_norm_eps, tie_embeddings=hf_cfg.tie_word_embeddings)
        H = hf_cfg.num_attention_heads
        if kind == "llama":
            if hf_cfg.attention_bias != hf_cfg.mlp_bias:
                raise ConfigError("cannot import Llama with attention_bias != mlp_bias; our bias flag covers both")
            kv = hf_cfg.num_key_value_heads
            attn = "mha" if kv == H else "mqa" if kv == 1 else "gqa"
            block = BlockConfig(attn=attn, n_head=H, n_kv_heads=kv, up_dim=hf_cfg.intermediate_size, non_linearity="swiglu")
            config = LLMconfig(**common, bias=hf_cfg.attention_bias, layers=[block] * hf_cfg.num_hidden_layers)
        else:
            hs = hf_cfg.hidden_size // H
            if (hf_cfg.qk_nope_head_dim, hf_cfg.v_head_dim) != (hs, hs) or hf_cfg.rope_interleave:
                raise ConfigError("cannot import DeepseekV3 unless qk_nope_head_dim = v_head_dim = hidden_size / heads "
                                  "and rope_interleave is false")
            if hf_cfg.rms_norm_eps != 1e-6:
                raise ConfigError(f"cannot import DeepseekV3 with rms_norm_eps={hf_cfg.rms_norm_eps}: its latent norms "
                                  "use 1e-6 and ours use the one norm_eps")
            has_moe = hf_cfg.first_k_dense_replace < hf_cfg.num_hidden_layers
            if has_moe and (hf_cfg.topk_group < hf_cfg.n_group or hf_cfg.routed_scaling_factor != 1.0):
                raise ConfigError("cannot import DeepseekV3 with group-limited routing (topk_group < n_group) or "
                                  "routed_scaling_factor != 1; our router has neither")
            mla = BlockConfig(attn="mla", n_head=H, q_latent_dim=hf_cfg.q_lora_rank or 0, kv_latent_dim=hf_cfg.kv_lora_rank,
                              rope_head_dim=hf_cfg.qk_rope_head_dim, up_dim=hf_cfg.intermediate_size, non_linearity="swiglu")
            moe = dataclasses.replace(
                mla, ffn="moe", up_dim=hf_cfg.moe_intermediate_size, n_exp=hf_cfg.n_routed_experts + hf_cfg.n_shared_experts,
                n_shared=hf_cfg.n_shared_experts, n_act=hf_cfg.num_experts_per_tok + hf_cfg.n_shared_experts,
                router_score="sigmoid", norm_topk=hf_cfg.norm_topk_prob, aux_free=True)
            n_dense = min(hf_cfg.first_k_dense_replace, hf_cfg.num_hidden_layers)
            config = LLMconfig(**common, bias=False, layers=[mla] * n_dense + [moe] * (hf_cfg.num_hidden_layers - n_dense))
    else:
        raise ConfigError(f"cannot import model_type {kind!r}; supported: gpt2, llama, deepseek_v3")
    config = dataclasses.replace(config, layers=[resolve_block(b, config.n_embd) for b in config.layers])
    validate_model(config)
    return config


def from_hf(directory: str, **overrides) -> LLM:
    """Our model with the weights of a transformers GPT-2, Llama or DeepseekV3 directory; `overrides` set model
    fields that do not change the weights (dropout, attn_backend)."""
    t = _transformers()
    try:
        hf = t.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a transformers model from {directory!r}: {str(e).splitlines()[0]}") from None
    model = LLM(dataclasses.replace(config_from_hf(hf.config), **overrides))
    theirs = hf.state_dict()
    with torch.no_grad():
        for name, ours in name_pairs(model, family(model.config)):
            if name not in theirs:
                raise ConfigError(f"{directory}: weight {name} not found; is it a {family(model.config)} checkpoint?")
            ours.copy_(theirs[name])  # `ours` is a view of our parameter in transformers' layout
    return model
