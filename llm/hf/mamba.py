"""Mamba (MambaForCausalLM): pure Mamba stacks, every layer x + mixer(RMSNorm(x)) (attn mamba, ffn none), no
position embedding, RMSNorm."""
import math

from ..config import BlockConfig, ConfigError, LLMconfig
from ..model.mixers.mamba import time_step_rank
from .common import Family, Weight, refuse, uniform, vocab_rows

IMPORT_BLOCK_SIZE = 2048  # block_size of an imported model whose config does not record one (Mamba has no limit)


def check(config: LLMconfig) -> None:
    """MambaForCausalLM needs RMSNorm and one set of Mamba sizes for all layers."""
    if config.norm != "rms":
        refuse(f"Mamba layers export as MambaForCausalLM, which needs RMSNorm (have norm={config.norm}); train with "
               "--norm rms")
    uniform(config.layers, "d_state", "expand", "d_conv", "dt_rank", "conv_bias", "dt_min", "dt_max", "dt_init",
            "dt_init_floor")


def hf_fields(config: LLMconfig) -> dict:
    """MambaConfig's arguments for our config; block_size travels as max_position_embeddings (our import reads it,
    transformers ignores it)."""
    block = config.layers[0]
    return dict(hidden_size=config.n_embd, num_hidden_layers=config.n_layer, state_size=block.d_state,
                expand=block.expand, conv_kernel=block.d_conv, time_step_rank=time_step_rank(block, config),
                use_bias=config.bias, use_conv_bias=block.conv_bias, layer_norm_epsilon=config.norm_eps,
                hidden_act="silu", residual_in_fp32=True, time_step_min=block.dt_min, time_step_max=block.dt_max,
                time_step_init_scheme=block.dt_init, time_step_floor=block.dt_init_floor, use_mambapy=False,
                max_position_embeddings=config.block_size)


def our_fields(hf_cfg) -> dict:
    """Our fields for a MambaConfig: attn mamba, ffn none, no positions, RMSNorm."""
    if hf_cfg.hidden_act != "silu":
        raise ConfigError(f"cannot import Mamba with hidden_act={hf_cfg.hidden_act!r}; ours uses silu")
    if hf_cfg.intermediate_size != hf_cfg.expand * hf_cfg.hidden_size:
        raise ConfigError(f"cannot import Mamba with intermediate_size={hf_cfg.intermediate_size} != expand * "
                          f"hidden_size; ours is expand={hf_cfg.expand} times n_embd={hf_cfg.hidden_size}")
    rank = int(hf_cfg.time_step_rank)
    block = BlockConfig(attn="mamba", ffn="none", d_state=hf_cfg.state_size, expand=hf_cfg.expand,
                        d_conv=hf_cfg.conv_kernel, dt_rank=None if rank == math.ceil(hf_cfg.hidden_size / 16) else rank,
                        conv_bias=hf_cfg.use_conv_bias, dt_min=hf_cfg.time_step_min, dt_max=hf_cfg.time_step_max,
                        dt_init=hf_cfg.time_step_init_scheme, dt_init_floor=hf_cfg.time_step_floor)
    return dict(block_size=getattr(hf_cfg, "max_position_embeddings", IMPORT_BLOCK_SIZE), n_embd=hf_cfg.hidden_size,
                n_layer=hf_cfg.num_hidden_layers, pos_emb="none", norm="rms", norm_eps=hf_cfg.layer_norm_epsilon,
                bias=hf_cfg.use_bias, layers=[block] * hf_cfg.num_hidden_layers)


WEIGHTS = (
    Weight("backbone.embeddings.weight", "tok_emb.weight", vocab_rows),
    Weight("backbone.norm_f.weight", "ln_f.weight"),
    Weight("lm_head.weight", "lm_head.weight", vocab_rows),
)
LAYER_WEIGHTS = (  # bias entries apply to models with --bias (projections) or --conv_bias (convolution)
    Weight("backbone.layers.{i}.norm.weight", "blocks.{i}.ln_1.weight"),
    Weight("backbone.layers.{i}.mixer.in_proj.weight", "blocks.{i}.attn.in_proj.weight"),
    Weight("backbone.layers.{i}.mixer.in_proj.bias", "blocks.{i}.attn.in_proj.bias"),
    Weight("backbone.layers.{i}.mixer.conv1d.weight", "blocks.{i}.attn.conv1d.weight"),
    Weight("backbone.layers.{i}.mixer.conv1d.bias", "blocks.{i}.attn.conv1d.bias"),
    Weight("backbone.layers.{i}.mixer.x_proj.weight", "blocks.{i}.attn.x_proj.weight"),
    Weight("backbone.layers.{i}.mixer.dt_proj.weight", "blocks.{i}.attn.dt_proj.weight"),
    Weight("backbone.layers.{i}.mixer.dt_proj.bias", "blocks.{i}.attn.dt_proj.bias"),
    Weight("backbone.layers.{i}.mixer.A_log", "blocks.{i}.attn.A_log"),
    Weight("backbone.layers.{i}.mixer.D", "blocks.{i}.attn.D"),
    Weight("backbone.layers.{i}.mixer.out_proj.weight", "blocks.{i}.attn.c_proj.weight"),
    Weight("backbone.layers.{i}.mixer.out_proj.bias", "blocks.{i}.attn.c_proj.bias"),
)

MAPPED = frozenset({"hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand", "conv_kernel",
                    "use_bias", "use_conv_bias", "hidden_act", "time_step_rank", "time_step_min", "time_step_max",
                    "time_step_init_scheme", "time_step_floor"})
IGNORED = frozenset({
    "time_step_scale", "rescale_prenorm_residual",  # initialisation only; imported weights replace it
    "residual_in_fp32",  # the precision of the residual stream (ours keeps the model's dtype), not the function
    "use_mambapy", "use_associative_scan",  # which implementation computes the same scan
})

MAMBA = Family("mamba", "Mamba", attn=frozenset({"mamba"}), ffn=frozenset({"none"}), pos_emb=frozenset({"none"}),
               check=check, config_class="MambaConfig", hf_fields=hf_fields, our_fields=our_fields, weights=WEIGHTS,
               layer_weights=LAYER_WEIGHTS, mapped=MAPPED, ignored=IGNORED)
