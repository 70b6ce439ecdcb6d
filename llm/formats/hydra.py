"""A Hydra-style model config of the modded-nanogpt set (HP2706/modded-nanogpt configs/): a YAML file whose
`defaults: [training]` composes training.yaml (from the same folder) under it, with a `model_cfg` for one family.

The family is model_cfg.type, else the file's name. The trainer behind these files always runs Muon on the hidden
matrices and Adam (0.8, 0.95, eps 1e-10, no weight decay) on the rest, with no warmup and a constant learning rate
followed by a linear decay over the last cooldown_frac of the steps; those settings come with every file.
"""
from pathlib import Path

from ..config import BlockConfig, ConfigError, LLMconfig, read_user_text
from .common import NSA_KEYS, Unmapped, expect_dict, model_with_layers, take
from .hydra_bytes import BYTE_DATASET, BYTE_FAMILIES, byte_family
from .hydra_diffusion import DIFFUSION_FAMILIES, diffusion_family
from .hydra_record import record_gpt

FAMILIES = ("current_best_gpt", "gpt2", "vanilla", "moe", "mod", "mtp", "mtm", "nsa", "ngpt", "rd", "mamba",
            *DIFFUSION_FAMILIES, *BYTE_FAMILIES)
RECIPE = dict(optimizer="muon", lr_schedule="trapezoid", warmup_steps=0, beta1=0.8, beta2=0.95, adam_eps=1e-10,
              weight_decay=0.0)
WITHOUT_EFFECT = {"use_liger", "fused_add_norm", "pad_token_id", "bos_token_id", "eos_token_id", "IS_MODAL"}
"""Kernel and launcher choices and token ids: they change how, not what, is computed (the tokenizer supplies ids)."""
TRAINER_CHOICES = {"type": "their trainer's model class; the family here is model_cfg.type or the file's name",
                   "model_adapter": "their trainer's wrapper of the model"}
"""training.yaml's keys that pick code in their trainer: every family file inherits them."""
MUST_BE_FALSE = {"use_fp8": "fp8 of their output head", "proj_fp8": "fp8 of their output head",
                 "use_adam_mini": "Adam-mini", "rescale_prenorm_residual": "their prenorm-residual rescaling"}
ENVIRONMENT = {"modal_data_path": "their container's data folder", "local_data_path": "their local data folder"}
"""data.yaml's keys that locate their data on their machines: --data_dir says where ours is."""
FAMILY_DEFAULTS = {"nsa": NSA_KEYS, "hnet_x_nsa": NSA_KEYS, "mtp": ("n_mtp_tokens", "use_deepseek_mtp")}
"""training.yaml keys that only one family reads: they fill its model_cfg where it leaves them out and change
nothing for the other families."""


def is_hydra(data: dict) -> bool:
    """A Hydra model config: a defaults list or a model_cfg section."""
    return "defaults" in data or "model_cfg" in data


def compose(path: Path, seen: tuple = ()) -> dict:
    """The file's mapping with its `defaults` (files of the same folder, in order) merged under it."""
    import yaml

    if path in seen:
        raise ConfigError(f"{path}: defaults form a cycle through {', '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (named in the defaults of {seen[-1] if seen else path})")
    try:
        data = expect_dict(yaml.safe_load(read_user_text(path, f"--config={str(path)!r}")), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    merged: dict = {}
    for entry in data.pop("defaults", None) or []:
        if entry == "_self_":
            continue
        if not isinstance(entry, str):
            raise ConfigError(f"{path}: defaults entry {entry!r} is a config group; only file names are composed")
        merged = deep_merge(merged, compose(path.parent / f"{entry}.yaml", seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def hydra_to_ours(data: dict, path: str, lenient: bool) -> dict:
    """Our config dict for a Hydra model config file (its defaults composed from its folder)."""
    data = compose(Path(path))
    cfg = expect_dict(data.pop("model_cfg", None), f"{path}: model_cfg")
    family = take(cfg, "type", Path(path).stem)
    if family not in FAMILIES:
        raise ConfigError(f"{path}: model family {family!r} is unknown; name the file or model_cfg.type one of "
                          f"{', '.join(FAMILIES)}")
    unmapped = Unmapped(path, "Hydra model config", lenient)
    for key in TRAINER_CHOICES:
        if data.get(key) is not None:
            unmapped.note(f"{key}={data[key]}", TRAINER_CHOICES[key])
        data.pop(key, None)
    train = dict(RECIPE)
    for owner, keys in FAMILY_DEFAULTS.items():
        for key in keys:
            value = data.get(key)
            if owner == family and value is not None:
                cfg.setdefault(key, value)
    for keys in FAMILY_DEFAULTS.values():
        for key in keys:
            data.pop(key, None)
    model, block = _shared(data, cfg, train, unmapped)
    if family in DIFFUSION_FAMILIES:
        model, block = diffusion_family(family, model, block, cfg, train, unmapped)
    elif family in BYTE_FAMILIES:
        model, layers = byte_family(family, model, block, cfg, train, unmapped)
    else:
        model, block = _family(family, model, block, cfg, unmapped)
    _training(data, train, model.get("block_size", LLMconfig.block_size), unmapped)
    if family == "current_best_gpt":  # after _training: its windows are in blocks of BLOCK_SIZE
        model, layers = record_gpt(model, block, train, unmapped)
    for section, prefix in ((cfg, "model_cfg."), (data, "")):
        for key in [k for k in section if k in WITHOUT_EFFECT or k in MUST_BE_FALSE]:
            value = section.pop(key)
            if key in MUST_BE_FALSE and value:
                unmapped.refuse(prefix + key, f"true; {MUST_BE_FALSE[key]} has no setting here")
        unmapped.unknown(section, prefix, ())
    unmapped.finish()
    n_layer = model.pop("n_layer")
    if family not in BYTE_FAMILIES and family != "current_best_gpt":
        layers = [block] * n_layer
    return {"model": model_with_layers(model, layers), "train": train}


def _shared(data: dict, cfg: dict, train: dict, unmapped: Unmapped) -> tuple[dict, BlockConfig]:
    """The sizes every family names (model_cfg first, then training.yaml's num_layers and model_dim)."""
    n_embd = take(cfg, "d_model", take(cfg, "model_dim", take(data, "model_dim", 768)))
    n_layer = take(cfg, "n_layers", take(cfg, "num_layers", take(data, "num_layers", 12)))
    data.pop("model_dim", None), data.pop("num_layers", None)
    model = dict(n_embd=n_embd, n_layer=n_layer, vocab_size=take(cfg, "vocab_size", 50257))
    seq_len = take(data, "train_seq_len", take(data, "seq_len"))  # data.yaml's seq_len: the same, of older files
    data.pop("seq_len", None)
    if "n_ctx" in cfg:
        model["block_size"] = take(cfg, "n_ctx")
    elif seq_len is not None:
        model["block_size"] = seq_len  # one long sequence per step, as their trainer
    if seq_len is not None:
        train["total_batch_size_str"] = str(seq_len)
        train["batch_size"] = max(1, seq_len // model["block_size"])
    if "tie_embeddings" in cfg:
        model["tie_embeddings"] = take(cfg, "tie_embeddings")
    return model, BlockConfig(attn="mha", n_head=take(cfg, "num_heads", 6), up_dim=4 * n_embd)


def _family(family: str, model: dict, block: BlockConfig, cfg: dict, unmapped: Unmapped):
    """The family's own kinds and keys."""
    from dataclasses import replace

    if family in ("gpt2", "vanilla"):  # GPT-2: learned positions, LayerNorm, biases, GELU
        model.update(pos_emb="learn", norm="layer", bias=True)
        return model, replace(block, non_linearity="gelu_tanh")
    if family == "ngpt":  # no norm layers: the states live on the unit sphere
        model.update(arch="ngpt", pos_emb="rope", bias=False, tie_embeddings=False)
        return model, replace(block, non_linearity="swiglu")
    model.update(pos_emb="rope", norm="rms", bias=False)
    if family == "current_best_gpt":  # record_gpt, once the training keys are read
        return model, block
    if family == "mamba":
        return _mamba(model, block, cfg, unmapped)
    if family == "moe":
        block = replace(block, ffn="moe", n_exp=take(cfg, "num_experts", 8), n_shared=0, n_act=take(cfg, "top_k", 2),
                        router_score=take(cfg, "gate_type", "mixtral"), jitter_noise=float(take(cfg, "jitter_noise", 0)),
                        coeff=float(take(cfg, "alpha", 0.01)))
        beta = float(take(cfg, "beta", 0.0))
        if beta:
            block = replace(block, router_z_loss=beta)
            unmapped.explain(f"model_cfg.beta={beta}", "--router_z_loss, ST-MoE's router z-loss (their "
                             "models/MixtureOfExperts.py computes it but leaves it out of the loss: pass "
                             "--router_z_loss 0 to train as they do)")
        if take(cfg, "gate_norm_factor") is not None:
            unmapped.refuse("model_cfg.gate_norm_factor", "no such setting here")
    elif family == "mod":
        block = replace(block, mod=True, capacity=float(take(cfg, "capacity", 0.125)))
        model["mod_every_other"] = take(cfg, "every_other", False)
    elif family in ("mtp", "mtm"):
        sequential = family == "mtm" or take(cfg, "use_deepseek_mtp", False)
        model.update(mtp="sequential" if sequential else "parallel",
                     n_mtp_tokens=take(cfg, "n_mtp_modules" if family == "mtm" else "n_mtp_tokens", 2))
        if "mtp_lambda" in cfg:
            model["mtp_lambda"] = float(take(cfg, "mtp_lambda"))
    elif family == "nsa":
        sizes = {key: take(cfg, key) for key in NSA_KEYS if key in cfg}
        block = replace(block, attn="nsa", **{k: v for k, v in sizes.items() if v is not None})
    elif family == "rd":
        depths = {"n_prelude": take(cfg, "l_p", 2), "n_core": take(cfg, "l_core", 4), "n_coda": take(cfg, "l_c", 2)}
        if sum(depths.values()) != model["n_layer"]:
            unmapped.note(f"model_cfg.n_layers={model['n_layer']}", "their recurrent-depth model builds l_p + l_core "
                          f"+ l_c = {sum(depths.values())} distinct layers and reads no n_layers")
        model.update(arch="recurrent", n_layer=sum(depths.values()), **depths)
        for key in ("mean_recurrence", "k_trunc", "r_max", "eval_recurrence", "adapter_mode"):
            if key in cfg:
                model[key] = take(cfg, key)
        for key in ("lognorm_var", "s0_std"):
            if key in cfg:
                model[key] = float(take(cfg, key))
    return model, block


def _mamba(model: dict, block: BlockConfig, cfg: dict, unmapped: Unmapped):
    """Mamba stacks (the transformers MambaConfig names): no positions, RMSNorm, no MLP."""
    from dataclasses import replace

    model.update(pos_emb="none")
    model["bias"] = take(cfg, "use_bias", False)
    rank = take(cfg, "time_step_rank", "auto")
    block = replace(block, attn="mamba", ffn="none", up_dim=None, d_state=take(cfg, "d_state", 16),
                    expand=take(cfg, "expand", 2), d_conv=take(cfg, "d_conv", 4),
                    dt_rank=None if rank == "auto" else rank, conv_bias=take(cfg, "use_conv_bias", True),
                    dt_min=float(take(cfg, "time_step_min", 0.001)), dt_max=float(take(cfg, "time_step_max", 0.1)),
                    dt_init=take(cfg, "time_step_init_scheme", "random"),
                    dt_init_floor=float(take(cfg, "time_step_floor", 1e-4)))
    for key, ours in (("hidden_act", "silu"), ("residual_in_fp32", True), ("time_step_scale", 1.0)):
        value = take(cfg, key, ours)
        if value != ours:
            unmapped.refuse(f"model_cfg.{key}", f"{value!r}; ours is fixed at {ours!r}")
    init = take(cfg, "initializer_range", 0.02)
    if init != 0.02:
        unmapped.note(f"model_cfg.initializer_range={init}", "their models/Mamba.py initialises its embedding at "
                      "std 0.02 without reading it, as here")
    return model, block


def _training(data: dict, train: dict, block_size: int, unmapped: Unmapped) -> None:
    """training.yaml's keys (and the model file's overrides of them); val_tokens become eval_iters batches of
    batch_size x block_size."""
    for theirs, ours in (("num_iterations", "max_iters"), ("val_loss_every", "eval_interval"),
                         ("save_checkpoint", "save_model"), ("torch_compile", "compile"), ("use_wandb", "wandb_log"),
                         ("BLOCK_SIZE", "window_block")):
        if theirs in data:
            train[ours] = take(data, theirs)
    if "eval_interval" in train:
        train["eval"] = True
    if "cooldown_frac" in data:
        train["cooldown_frac"] = float(take(data, "cooldown_frac"))
    if take(data, "bfloat16", False):
        train["dtype"] = "bfloat16"
    shards = [f"{key}={take(data, key)}" for key in ("train_files", "val_files") if data.get(key) is not None]
    if shards:
        byte_model = train.get("dataset") == BYTE_DATASET
        prepare = ("python -m llm.data.prepare fineweb --tokenizer byte --out data/fineweb_byte, then --dataset "
                   "fineweb_byte" if byte_model else "python -m llm.data.prepare fineweb, then --dataset fineweb")
        unmapped.note(" and ".join(shards), f"their trainer's token shards; here: {prepare}")
    val_tokens = take(data, "val_tokens")
    if val_tokens is not None:  # validation reads eval_iters batches of batch_size x block_size
        train["eval_iters"] = max(1, val_tokens // (train.get("batch_size", 1) * block_size))
    if take(data, "val_seq_len") is not None:
        unmapped.note("val_seq_len", "validation reads batches of batch_size x block_size, as training")
    for key, what in ENVIRONMENT.items():
        value = take(data, key)
        if value is not None:
            unmapped.note(f"{key}={value}", f"{what}; --data_dir says where the prepared data is")
