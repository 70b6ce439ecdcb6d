"""GPT-2 (GPT2LMHeadModel): MHA, learned positions, LayerNorm, a plain activation; biases always present."""
from ..config import BlockConfig, ConfigError, LLMconfig
from ..model.mixers.gqa import head_size
from .common import Family, Weight, act_name, only, refuse, same, transposed, uniform, vocab_rows

ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "tanh": "tanh"}
"""Our activation -> GPT-2's activation_function."""


def check(config: LLMconfig) -> None:
    """GPT-2 needs LayerNorm, an activation it has, and one head count, width and activation for all layers."""
    acts = {act_name(b) for b in config.layers}
    if config.norm != "layer" or not acts <= set(ACTIVATIONS):
        refuse(f"learned positions export as GPT-2, which needs LayerNorm and one of the activations "
               f"{', '.join(ACTIVATIONS)} (have norm={config.norm}, non_linearity={sorted(acts)}); "
               "train with --norm layer and one of them")
    uniform(config.layers, "n_head", "up_dim")
    same([act_name(b) for b in config.layers], "non_linearity")
    if any(head_size(b, config) * b.n_head != config.n_embd for b in config.layers):
        refuse("GPT-2's heads are n_embd / n_head wide; train without --head_dim")


def hf_fields(config: LLMconfig) -> dict:
    """GPT2Config's arguments for our config (dropout off: transformers is for inference here)."""
    block = config.layers[0]
    return dict(n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=block.n_head,
                n_inner=block.up_dim, activation_function=ACTIVATIONS[act_name(block)],
                layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def our_fields(hf_cfg) -> dict:
    """Our fields for a GPT2Config: learned positions, LayerNorm, biases, MHA layers."""
    act = {v: k for k, v in ACTIVATIONS.items()}.get(hf_cfg.activation_function)
    if act is None:
        raise ConfigError(f"cannot import GPT-2 with activation {hf_cfg.activation_function!r}")
    block = BlockConfig(attn="mha", n_head=hf_cfg.n_head, up_dim=hf_cfg.n_inner or 4 * hf_cfg.n_embd, non_linearity=act)
    return dict(block_size=hf_cfg.n_positions, n_embd=hf_cfg.n_embd, n_layer=hf_cfg.n_layer, pos_emb="learn",
                norm="layer", norm_eps=hf_cfg.layer_norm_epsilon, bias=True, layers=[block] * hf_cfg.n_layer)


WEIGHTS = (
    Weight("transformer.wte.weight", "tok_emb.weight", vocab_rows),
    Weight("transformer.wpe.weight", "pos_emb.table.weight"),
    Weight("transformer.ln_f.weight", "ln_f.weight"),
    Weight("transformer.ln_f.bias", "ln_f.bias", zero_if_absent=True),
    Weight("lm_head.weight", "lm_head.weight", vocab_rows),
)
LAYER_WEIGHTS = (  # Conv1D weights are stored transposed; a model without biases exports zero biases
    Weight("transformer.h.{i}.ln_1.weight", "blocks.{i}.ln_1.weight"),
    Weight("transformer.h.{i}.ln_1.bias", "blocks.{i}.ln_1.bias", zero_if_absent=True),
    Weight("transformer.h.{i}.attn.c_attn.weight", "blocks.{i}.attn.c_attn.weight", transposed),
    Weight("transformer.h.{i}.attn.c_attn.bias", "blocks.{i}.attn.c_attn.bias", zero_if_absent=True),
    Weight("transformer.h.{i}.attn.c_proj.weight", "blocks.{i}.attn.c_proj.weight", transposed),
    Weight("transformer.h.{i}.attn.c_proj.bias", "blocks.{i}.attn.c_proj.bias", zero_if_absent=True),
    Weight("transformer.h.{i}.ln_2.weight", "blocks.{i}.ln_2.weight"),
    Weight("transformer.h.{i}.ln_2.bias", "blocks.{i}.ln_2.bias", zero_if_absent=True),
    Weight("transformer.h.{i}.mlp.c_fc.weight", "blocks.{i}.ffn.c_fc.weight", transposed),
    Weight("transformer.h.{i}.mlp.c_fc.bias", "blocks.{i}.ffn.c_fc.bias", zero_if_absent=True),
    Weight("transformer.h.{i}.mlp.c_proj.weight", "blocks.{i}.ffn.c_proj.weight", transposed),
    Weight("transformer.h.{i}.mlp.c_proj.bias", "blocks.{i}.ffn.c_proj.bias", zero_if_absent=True),
)

MAPPED = frozenset({"n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                    "layer_norm_epsilon"})
REFUSALS = (
    only("scale_attn_weights", True, "our attention divides scores by sqrt(head size)"),
    only("scale_attn_by_inverse_layer_idx", False, "our attention does not scale scores by layer"),
    only("add_cross_attention", False, "our models are decoder-only, without cross-attention"),
)
IGNORED = frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop",  # dropout: training only (ours is --dropout)
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",  # classification heads
    "summary_first_dropout", "reorder_and_upcast_attn",  # the latter: fp16 numerics of the same function
})

GPT2 = Family("gpt2", "GPT-2", attn=frozenset({"mha"}), ffn=frozenset({"dense"}), pos_emb=frozenset({"learn"}),
              check=check, config_class="GPT2Config", hf_fields=hf_fields, our_fields=our_fields, weights=WEIGHTS,
              layer_weights=LAYER_WEIGHTS, mapped=MAPPED, refusals=REFUSALS, ignored=IGNORED)
