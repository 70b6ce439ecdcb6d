"""The byte-level families of the modded-nanogpt configs (megabyte.yaml, hnet.yaml, hnet_x_nsa.yaml) mapped onto the
papers' models: each key takes its meaning in MegaByte (Yu et al. 2023) or H-Net (Hwang et al. 2025). That
repository's own models are not followed where they depart from the papers (MegaByte's global and local depths
swapped and an end-of-text id beyond its vocabulary; H-Net's embeddings of 8 rows and its ratio loss never added;
hnet_x_nsa's fixed groups of two positions that read later tokens).

The models read bytes: the converted run trains on `shakespeare_byte` unless --dataset names another byte dataset,
and the vocabulary is the dataset's (256), the pad and end-of-text ids of those files having no use here (a
sequence's and a patch's start are learned vectors).
"""
from dataclasses import replace

from ..config import BlockConfig
from .common import NSA_KEYS, Unmapped, take

BYTE_FAMILIES = ("megabyte", "hnet", "hnet_x_nsa")
BYTE_DATASET = "shakespeare_byte"
MAMBA = dict(attn="mamba", ffn="none", up_dim=None)  # H-Net's outer layers (the paper's Mamba-2; Mamba here)


def byte_family(family: str, model: dict, block: BlockConfig, cfg: dict, train: dict, unmapped: Unmapped
                ) -> tuple[dict, list[BlockConfig]]:
    """model and its layer specs for the family, its keys mapped (train: the byte dataset)."""
    vocab = model.pop("vocab_size")
    unmapped.note(f"model_cfg.vocab_size={vocab}", f"the model reads bytes: the vocabulary is the byte dataset's "
                                                   f"(train on {BYTE_DATASET} or another prepared with --tokenizer byte)")
    train["dataset"] = BYTE_DATASET
    if family == "megabyte":
        return _megabyte(model, block, cfg, unmapped)
    return _hnet(family, model, block, cfg, unmapped)


def _megabyte(model: dict, block: BlockConfig, cfg: dict, unmapped: Unmapped) -> tuple[dict, list[BlockConfig]]:
    """patch_size, d_global_pre_patch -> global_byte_embd, d_local -> n_embd, n_layers_d_global/local and
    global/local_n_heads -> the two stacks' layers, d_mult -> each MLP's width over its stack's."""
    P, D = take(cfg, "patch_size", 16), take(cfg, "d_global_pre_patch", 64)
    local = take(cfg, "d_local", model["n_embd"])
    n_global, n_local = take(cfg, "n_layers_d_global", 6), take(cfg, "n_layers_d_local", 6)
    mult = take(cfg, "d_mult", 4)
    model.update(arch="megabyte", n_embd=local, patch_size=P, global_byte_embd=D, n_global_layer=n_global,
                 n_layer=n_global + n_local, pos_emb="learn")
    ids = [f"{key}={take(cfg, key)}" for key in ("pad_id", "eos_id") if key in cfg]
    if ids:
        unmapped.note(f"model_cfg.{' and '.join(ids)}", "the first patch and each patch's first byte read learned "
                                                        "start vectors here; end of text is byte 0 of the data")
    if not take(cfg, "is_causal", True):
        unmapped.refuse("model_cfg.is_causal", "false; MegaByte predicts each byte from the bytes before it")
    global_block = replace(block, n_head=take(cfg, "global_n_heads", 4), up_dim=mult * P * D)
    local_block = replace(block, n_head=take(cfg, "local_n_heads", 8), up_dim=mult * local)
    return model, [global_block] * n_global + [local_block] * n_local


def _hnet(family: str, model: dict, block: BlockConfig, cfg: dict, unmapped: Unmapped
          ) -> tuple[dict, list[BlockConfig]]:
    """One stage: an encoder and a decoder of Mamba layers (num_compression_layers, or
    n_compress_decompress_layers), a main network of attention layers with a SwiGLU MLP (num_main_layers, or NSA
    layers: n_inner_layers), RMSNorm and RoPE; the target downsampling N is 1 / compression_ratio (hnet) or
    compression_decompress_size (hnet_x_nsa)."""
    if family == "hnet":
        outer, main = take(cfg, "num_compression_layers", 4), take(cfg, "num_main_layers", 12)
        ratio = 1 / float(take(cfg, "compression_ratio", 0.5))
        main_block = replace(block, non_linearity="swiglu", up_dim=round(8 * model["n_embd"] / 3 / 64) * 64)
    else:
        outer, main = take(cfg, "n_compress_decompress_layers", 3), take(cfg, "n_inner_layers", 6)
        ratio = float(take(cfg, "compression_decompress_size", 8))
        sizes = {key: take(cfg, key) for key in NSA_KEYS if cfg.get(key) is not None}
        main_block = replace(block, attn="nsa", non_linearity="swiglu",
                             up_dim=round(8 * model["n_embd"] / 3 / 64) * 64, **sizes)
        if take(cfg, "dummy", False):
            unmapped.refuse("model_cfg.dummy", "true; the main network here is native sparse attention")
        unmapped.note("model_cfg.type=hnet_x_nsa", "an H-Net with NSA in its main network (their fixed groups of two "
                                                   "positions read later tokens; the chunks here are dynamic)")
    if ratio <= 1:
        unmapped.refuse("model_cfg.compression_ratio", f"{1 / ratio}; the chunks must be fewer than the positions "
                                                       "(a ratio below 1)")
        ratio = 2.0
    model.update(arch="hnet", n_layer=2 * outer + main, hnet_encoder_layers=[outer], hnet_decoder_layers=[outer],
                 hnet_ratios=[ratio], pos_emb="rope", norm="rms", bias=False)
    mamba = replace(block, **MAMBA)
    return model, [mamba] * outer + [main_block] * main + [mamba] * outer
