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
SOURCE_KEYS = ("path", "subset", "split", "streaming", "text_field")
RUN_NOTES = {"per_device_eval_batch_size": "evaluation reads batches of --batch_size",
             "log_level": "their logging verbosity; the metrics line is printed every --log_interval steps",
             "tf32": "fp32 matmuls run in full fp32 here, as PyTorch's default"}
"""train_config keys of transformers' TrainingArguments that set nothing of the run here: noted."""


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
    _evals(sections["eval_config"], unmapped)
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
    if cfg.get("tf32"):
        del cfg["tf32"]
        unmapped.refuse("train_config.tf32", "true; TF32 has no setting here (fp32 matmuls run in full fp32): drop "
                        "it, or use --dtype bfloat16 for faster matmuls")
    for key, why in RUN_NOTES.items():
        if key in cfg:
            unmapped.note(f"train_config.{key}={take(cfg, key)}", why)
    unmapped.unknown(cfg, "train_config.", ())
    return train


def _data(cfg: dict, train: dict, unmapped: Unmapped) -> int | None:
    """dataset_config's datasets become the data mix (by name, as prepared datasets), each source noted with the
    command that prepares it; returns max_seq_length."""
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
        source = {key: take(entry, key) for key in SOURCE_KEYS if entry.get(key) is not None}
        if source:
            unmapped.note(f"dataset_config.datasets.{name}", prepare_command(name, source))
        unmapped.unknown(entry, f"dataset_config.datasets.{name}.", ())
    if len(parts) == 1:
        train["dataset"] = parts[0].rpartition(":")[0]
    elif parts:
        train["data_mix"] = ",".join(parts)
    tokenizer = take(cfg, "tokenizer_name")
    if tokenizer is not None:
        unmapped.note(f"dataset_config.tokenizer_name={tokenizer}", "the tokenizer is the prepared dataset's: "
                      "gpt2 (r50k_base) by default, the only tiktoken vocabulary offered here")
    block_size = take(cfg, "max_seq_length")
    unmapped.unknown(cfg, "dataset_config.", ())
    return block_size


def prepare_command(name: str, source: dict) -> str:
    """The command that prepares a dataset_config source (a Hugging Face dataset) as data/NAME: from its split saved
    as a local .jsonl file."""
    split = "/".join(str(source[key]) for key in ("subset", "split") if key in source)
    origin = f"the {split} split of {source.get('path', name)}" if split else source.get("path", name)
    field = source.get("text_field", "text")
    return (f"save {origin} as {name}.jsonl, then: python -m llm.data.prepare text --source {name}.jsonl "
            f"--text_field {field} --out data/{name}")


def _evals(cfg: dict, unmapped: Unmapped) -> None:
    """eval_config: OpenAI evals by name, noted with the command that scores a checkpoint on lm-evaluation-harness
    tasks of those names."""
    evals = take(cfg, "evals") or []
    if evals:
        unmapped.note(f"eval_config.evals={','.join(map(str, evals))}", "after training: python -m llm.eval lm_eval "
                      f"--ckpt OUT_DIR/RUN --tasks {','.join(map(str, evals))}")
    for key in list(cfg):
        unmapped.note(f"eval_config.{key}={take(cfg, key)}", "their OpenAI evals setting")


def _wandb(cfg: dict, train: dict, unmapped: Unmapped) -> None:
    """wandb_config: project and name (logging switched on); the entity and model logging are noted."""
    if "project" in cfg:
        train.update(wandb_log=True, wandb_project=take(cfg, "project"))
    if "name" in cfg:
        train["wandb_run_name"] = take(cfg, "name")
    if "entity" in cfg:
        unmapped.note(f"wandb_config.entity={take(cfg, 'entity')}", "wandb logs to the WANDB_ENTITY of the "
                      "environment, else the logged-in user's")
    if "log_model" in cfg:
        unmapped.note(f"wandb_config.log_model={take(cfg, 'log_model')}", "checkpoints stay in the run directory")
    for key in cfg:
        unmapped.refuse(f"wandb_config.{key}", "no such setting here")
