"""A HELM model config (johnsonandjohnson/HELM, downstream/model_configs): {model_type, mode, tokenizer, helm,
model_config: {model, d_model, n_layer, d_intermediate, pos_embedding, max_position_embeddings, bidirectional}}.

model_type picks the mixer (transformer: GPT-2 layers; mamba: Mamba, bidirectional Mamba under mlm; hyena), mode the
objective, tokenizer the prepared dataset (genomic_3mer or genomic_nuc), helm: true the hierarchical cross-entropy.
"""
from ..config import BlockConfig, ConfigError
from .common import Unmapped, expect_dict, model_with_layers, take

TOP_KEYS = {"model_type", "mode", "tokenizer", "helm", "model_config"}
MODELS = {"transformer": "gpt2", "mamba": "mamba", "hyena": "hyena"}
"""HELM's model_type -> the model_config.model it names."""
POSITIONS = {"absolute": "learn", "rope": "rope", "none": "none"}
HEAD_SIZE = 64
"""HELM's schema gives no head count; its GPT-2 models use heads of 64 (d_model 640: 10 heads)."""


def is_helm(data: dict) -> bool:
    """A HELM model config: model_type and model_config, with mode, tokenizer or helm beside them."""
    return "model_config" in data and "model_type" in data and bool({"mode", "tokenizer", "helm"} & set(data))


def helm_to_ours(data: dict, path: str, lenient: bool) -> dict:
    """Our config dict for a HELM model config."""
    data = dict(data)
    unmapped = Unmapped(path, "HELM model config", lenient)
    kind = take(data, "model_type")
    if kind not in MODELS:
        raise ConfigError(f"{path}: model_type={kind!r} is not one of {', '.join(MODELS)}")
    mode = take(data, "mode", "clm")
    if mode not in ("mlm", "clm"):
        raise ConfigError(f"{path}: mode={mode!r} is not mlm or clm")
    tokenizer = take(data, "tokenizer", "3mer")
    if tokenizer not in ("3mer", "nuc"):
        raise ConfigError(f"{path}: tokenizer={tokenizer!r} is not 3mer or nuc (HELM's 6-mer vocabulary has no "
                          "tokenizer here)")
    helm = take(data, "helm", False)
    if helm and tokenizer != "3mer":
        raise ConfigError(f"{path}: helm=true needs tokenizer 3mer (the codon tree), not {tokenizer!r}")
    cfg = expect_dict(take(data, "model_config"), f"{path}: model_config")
    unmapped.unknown(data, "", TOP_KEYS)
    model_name = take(cfg, "model", MODELS[kind])
    if model_name != MODELS[kind] and not (kind == "mamba" and model_name == "bimamba"):
        unmapped.refuse("model_config.model", f"{model_name!r}; model_type {kind} builds {MODELS[kind]}")
    d_model = take(cfg, "d_model", 768)
    n_layer = take(cfg, "n_layer", 12)
    d_intermediate = take(cfg, "d_intermediate", 4 * d_model)
    position = take(cfg, "pos_embedding", "absolute" if kind == "transformer" else "none")
    if position not in POSITIONS:
        unmapped.refuse("model_config.pos_embedding", f"{position!r} is not one of {', '.join(POSITIONS)}")
    block_size = take(cfg, "max_position_embeddings", 2048)
    bidirectional = take(cfg, "bidirectional", mode == "mlm")
    if bidirectional and mode == "clm":
        unmapped.refuse("model_config.bidirectional", "true with mode clm; our causal objective sees no later tokens")
    unmapped.unknown(cfg, "model_config.", ())
    unmapped.finish()
    model = dict(n_embd=d_model, block_size=block_size, pos_emb=POSITIONS.get(position, "learn"),
                 objective=mode, loss="hxe" if helm else "ce")
    if kind == "transformer":
        model.update(norm="layer", bias=True, tie_embeddings=True)
        block = BlockConfig(attn="mha", n_head=max(1, d_model // HEAD_SIZE), up_dim=d_intermediate,
                            non_linearity="gelu_tanh")
    elif kind == "mamba":  # mamba_ssm: RMSNorm, d_intermediate 0 means no MLP, a SwiGLU MLP otherwise
        model.update(norm="rms")
        block = BlockConfig(attn="bimamba" if mode == "mlm" else "mamba", ffn="dense" if d_intermediate else "none",
                            up_dim=d_intermediate or None, non_linearity="swiglu")
    else:
        block = BlockConfig(attn="hyena", up_dim=d_intermediate, non_linearity="gelu")
    return {"model": model_with_layers(model, [block] * n_layer), "train": {"dataset": f"genomic_{tokenizer}"}}
