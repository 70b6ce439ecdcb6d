"""Mixtral (MixtralForCausalLM): Mistral's attention with a MoE layer in every block: num_local_experts SwiGLU experts,
no shared ones, each token using num_experts_per_tok of them weighted by a softmax over their router logits."""
import dataclasses

from ..config import LLMconfig
from .common import Family, Weight, only, refuse, uniform
from .llama import LAYER_WEIGHTS as LLAMA_LAYER_WEIGHTS
from .llama import WEIGHTS
from .mistral import MAPPED as MISTRAL_MAPPED
from .mistral import REFUSALS as MISTRAL_REFUSALS
from .mistral import check as mistral_check
from .mistral import hf_fields as mistral_hf_fields
from .mistral import our_fields as mistral_our_fields


def check(config: LLMconfig) -> None:
    """Mistral's requirements, and in every layer the same MoE: no shared experts, Mixtral's router, no selection
    bias, groups or scaling, no jitter (Mixtral's jitters the experts' inputs too, ours the router's only)."""
    layers = config.layers  # every one a MoE layer: the family takes ffn moe only
    mistral_check(config)
    uniform(layers, "n_exp", "n_act", "n_shared", "router_score", "aux_free", "n_group", "routed_scaling_factor",
            "jitter_noise")
    block = layers[0]
    if block.n_shared or block.router_score != "mixtral":
        refuse(f"Mixtral has no shared experts and weighs the chosen experts by a softmax over their logits (have "
               f"n_shared={block.n_shared}, router_score={block.router_score}); train with --n_shared 0 "
               "--router_score mixtral")
    if block.aux_free or block.routed_scaling_factor != 1 or block.n_group != 1:
        refuse("Mixtral's router has no selection bias, expert groups or gate scaling; train without --aux_free, "
               "--n_group and --routed_scaling_factor")
    if block.jitter_noise:
        refuse(f"jitter_noise={block.jitter_noise}: Mixtral's router_jitter_noise scales the experts' inputs too, "
               "ours the router's only; train with --jitter_noise 0")


def hf_fields(config: LLMconfig) -> dict:
    """MixtralConfig's arguments: Mistral's, the experts' width and counts."""
    block = config.layers[0]
    return dict(mistral_hf_fields(config), num_local_experts=block.n_exp, num_experts_per_tok=block.n_act)


def our_fields(hf_cfg) -> dict:
    """Our fields for a MixtralConfig: Mistral's layers with its experts (the Switch balance loss at our default
    weight: transformers' pools all layers into one loss, so router_aux_loss_coef does not carry over)."""
    fields = mistral_our_fields(hf_cfg)
    block = dataclasses.replace(fields["layers"][0], ffn="moe", n_exp=hf_cfg.num_local_experts, n_shared=0,
                                n_act=hf_cfg.num_experts_per_tok, router_score="mixtral")
    return dict(fields, layers=[block] * hf_cfg.num_hidden_layers)


LAYER_WEIGHTS = tuple(w for w in LLAMA_LAYER_WEIGHTS if ".mlp." not in w.theirs and not w.theirs.endswith("bias")) + (
    Weight("model.layers.{i}.mlp.gate.weight", "blocks.{i}.ffn.router.gate.weight"),
    Weight("model.layers.{i}.mlp.experts.gate_up_proj", "blocks.{i}.ffn.experts.c_fc.weight"),  # (E, 2 up, C)
    Weight("model.layers.{i}.mlp.experts.down_proj", "blocks.{i}.ffn.experts.c_proj.weight"),  # (E, C, up)
)

MIXTRAL = Family("mixtral", "Mixtral", attn=frozenset({"mha", "mqa", "gqa"}), ffn=frozenset({"moe"}),
                 pos_emb=frozenset({"rope"}), check=check, config_class="MixtralConfig", hf_fields=hf_fields,
                 our_fields=our_fields, weights=WEIGHTS, layer_weights=LAYER_WEIGHTS, windows=True,
                 mapped=MISTRAL_MAPPED | {"num_local_experts", "num_experts_per_tok"},
                 refusals=MISTRAL_REFUSALS + (only("router_jitter_noise", 0.0, "Mixtral's jitter scales the "
                                                   "experts' inputs too, ours the router's only"),),
                 ignored=frozenset({"attention_dropout", "output_router_logits",  # dropout: training; an output
                                    "router_aux_loss_coef"}))  # training only, pooled over layers (see our_fields)
