"""An llm720 YAML (wrmedford/llm720 configs/config.yaml): sections model_config (an MLA transformer with PEER layers
from peer_start_layer on), train_config (transformers TrainingArguments names), dataset_config (a weighted mix),
eval_config and wandb_config.

llm720's model is DeepSeek-style: MLA with RoPE, RMSNorm and SwiGLU MLPs in the layers before peer_start_layer.
"""
import dataclasses

from ..config import BlockConfig, ConfigError
from .common import Unmapped, expect_dict, model_with_layers, take

SECTIONS = ("model_config", "train_config", "dataset_config", "eval_config", "wandb_config")
PEER_KEYS = {"num_experts", "num_experts_per_tok", "num_heads", "expert_hidden_size", "product_key_dim", "query_dim",
             "batch_norm_query"}
"""peer_config keys that are BlockConfig fields of the same name."""
INIT_STD = 0.02
"""Our linear and embedding initialisation (initializer_range must equal it)."""
SOURCE_KEYS = ("path", "split", "streaming", "text_field")


def is_llm720(data: dict) -> bool:
    """An llm720 YAML: one of its sections besides model_config, or a model_config of transformers names."""
    model = data.get("model_config")
    return bool(set(SECTIONS[1:]) & set(data)) or (isinstance(model, dict) and "hidden_size" in model)


def llm720_to_ours(data: dict, path: str, lenient: bool) -> dict:
    """Our config dict for an llm720 YAML."""
    unmapped = Unmapped(path, "llm720 YAML", lenient)
    unmapped.unknown(data, "", SECTIONS)
    sections = {name: expect_dict(data.get(name), f"{path}: {name}") for name in SECTIONS}
    train = _train(sections["train_config"], unmapped)
    model, blocks = _model(sections["model_config"], train, unmapped)
    block_size = _data(sections["dataset_config"], train, unmapped)
    if block_size is not None:
        if "block_size" in model and model["block_size"] != block_size:
            unmapped.refuse("dataset_config.max_seq_length", f"{block_size} differs from model_config."
                            f"max_position_embeddings={model['block_size']}; our context length is one value")
        model["block_size"] = block_size
    batch, accumulation = train.pop("batch_size", None), train.pop("accumulation", 1)
    if batch is not None:
        train["batch_size"] = batch
        train["total_batch_size_str"] = f"{batch}*{accumulation}*{model.get('block_size', 2048)}"
    for key in sections["eval_config"]:
        unmapped.refuse(f"eval_config.{key}", "OpenAI evals; use --eval_tasks with HellaSwag files or lm_eval tasks")
    _wandb(sections["wandb_config"], train, unmapped)
    unmapped.finish()
    return {"model": model_with_layers(model, blocks), "train": train}


def _model(cfg: dict, train: dict, unmapped: Unmapped) -> tuple[dict, list[BlockConfig]]:
    """Model fields and layers of model_config (PEER's usage reporting goes to `train`)."""
    n_embd = take(cfg, "hidden_size", 768)
    n_head = take(cfg, "num_attention_heads", 12)
    n_layer = take(cfg, "num_hidden_layers", 12)
    model = dict(n_embd=n_embd, pos_emb="rope", norm="rms", bias=False)
    for theirs, ours in (("vocab_size", "vocab_size"), ("max_position_embeddings", "block_size"),
                         ("layer_norm_eps", "norm_eps")):
        if theirs in cfg:
            model[ours] = take(cfg, theirs)
    init = take(cfg, "initializer_range", INIT_STD)
    if init != INIT_STD:
        unmapped.refuse("model_config.initializer_range", f"{init}; our initialisation std is {INIT_STD}")
    mla = expect_dict(take(cfg, "mla_config"), "model_config.mla_config")
    head_dims = {key: take(mla, key) for key in ("qk_nope_head_dim", "v_head_dim") if key in mla}
    if "rope_theta" in mla:
        model["rope_theta"] = float(take(mla, "rope_theta"))
    dense = BlockConfig(attn="mla", n_head=n_head, q_latent_dim=take(mla, "q_lora_rank", 0) or 0,
                        kv_latent_dim=take(mla, "kv_lora_rank", 512), rope_head_dim=take(mla, "qk_rope_head_dim", 64),
                        up_dim=take(cfg, "intermediate_size", 4 * n_embd), non_linearity="swiglu", **head_dims)
    unmapped.unknown(mla, "model_config.mla_config.", ())
    use_peer = take(cfg, "use_peer", False)
    start = take(cfg, "peer_start_layer", 2)
    peer_cfg = expect_dict(take(cfg, "peer_config"), "model_config.peer_config")
    peer = dataclasses.replace(dense, ffn="peer", **{k: take(peer_cfg, k) for k in PEER_KEYS if k in peer_cfg})
    if not take(peer_cfg, "log_expert_usage", True):
        unmapped.refuse("model_config.peer_config.log_expert_usage", "false; our PEER layers always report usage "
                        "(raise log_freq)")
    if "log_freq" in peer_cfg:
        train["peer_log_interval"] = take(peer_cfg, "log_freq")
    if "usage_threshold" in peer_cfg:
        train["usage_threshold"] = float(take(peer_cfg, "usage_threshold"))
    unmapped.unknown(peer_cfg, "model_config.peer_config.", ())
    unmapped.unknown(cfg, "model_config.", ())
    blocks = [peer if use_peer and i >= start else dense for i in range(n_layer)]
    return model, blocks


def _train(cfg: dict, unmapped: Unmapped) -> dict:
    """Run fields of train_config (transformers TrainingArguments names); batch and accumulation are returned as
    batch_size and accumulation for the caller to turn into tokens per step."""
    train = {}
    renames = {"output_dir": "out_dir", "per_device_train_batch_size": "batch_size", "learning_rate": "learning_rate",
               "weight_decay": "weight_decay", "max_grad_norm": "grad_clip", "max_steps": "max_iters",
               "logging_steps": "log_interval", "save_steps": "ckpt_interval", "seed": "seed",
               "gradient_accumulation_steps": "accumulation"}
    for theirs, ours in renames.items():
        if theirs in cfg:
            value = take(cfg, theirs)
            train[ours] = float(value) if ours in ("learning_rate", "weight_decay", "grad_clip") else value
    if "eval_steps" in cfg:
        train.update(eval=True, eval_interval=take(cfg, "eval_steps"))
    schedule = take(cfg, "lr_scheduler_type", "linear")
    if schedule == "cosine":
        train.update(lr_schedule="cosine", min_lr=0.0)  # transformers' cosine decays to zero
    else:
        unmapped.refuse("train_config.lr_scheduler_type", f"{schedule!r}; only cosine (to zero) is mapped")
    if "warmup_ratio" in cfg:
        train["warmup_steps"] = round(take(cfg, "warmup_ratio") * train.get("max_iters", 500))
    fp16, bf16 = take(cfg, "fp16", False), take(cfg, "bf16", False)
    if fp16 and bf16:
        unmapped.refuse("train_config.fp16", "true together with bf16: true; keep one")
    elif fp16 or bf16:
        train["dtype"] = "float16" if fp16 else "bfloat16"
    resume = take(cfg, "resume_from_checkpoint")
    if resume is not None:
        train["resume"] = str(resume)
    unmapped.unknown(cfg, "train_config.", ())
    return train


def _data(cfg: dict, train: dict, unmapped: Unmapped) -> int | None:
    """dataset_config's datasets become the data mix (by name, as prepared datasets); returns max_seq_length."""
    datasets = take(cfg, "datasets", []) or []
    if not isinstance(datasets, list):
        raise ConfigError("dataset_config.datasets must be a list of {name, weight, ...} entries")
    parts = []
    for i, entry in enumerate(datasets):
        entry = expect_dict(entry, f"dataset_config.datasets item {i}")
        name, weight = take(entry, "name"), take(entry, "weight", 1.0)
        if not isinstance(name, str):
            raise ConfigError(f"dataset_config.datasets item {i} needs a name (the prepared dataset's folder)")
        parts.append(f"{name}:{weight}")
        for key in SOURCE_KEYS:
            if entry.pop(key, None) is not None:
                unmapped.refuse(f"dataset_config.datasets.{name}.{key}",
                                f"a streaming source; prepare it as data/{name} with python -m llm.data.prepare")
        unmapped.unknown(entry, f"dataset_config.datasets.{name}.", ())
    if len(parts) == 1:
        train["dataset"] = parts[0].rpartition(":")[0]
    elif parts:
        train["data_mix"] = ",".join(parts)
    if take(cfg, "tokenizer_name") is not None:
        unmapped.refuse("dataset_config.tokenizer_name", "the tokenizer is the prepared dataset's")
    block_size = take(cfg, "max_seq_length")
    unmapped.unknown(cfg, "dataset_config.", ())
    return block_size


def _wandb(cfg: dict, train: dict, unmapped: Unmapped) -> None:
    """wandb_config: project and name (logging switched on)."""
    if "project" in cfg:
        train.update(wandb_log=True, wandb_project=take(cfg, "project"))
    if "name" in cfg:
        train["wandb_run_name"] = take(cfg, "name")
    for key in cfg:
        unmapped.refuse(f"wandb_config.{key}", "no such setting here")
