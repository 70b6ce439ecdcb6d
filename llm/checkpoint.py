"""Checkpoints: one folder per saved step under RUN/checkpoints/, written atomically.

    step_0000500/llm.safetensors  full weights (keys of the uncompiled module, buffers such as MoE biases included)
    step_0000500/weights.sha256   the weights file's SHA-256 (as sha256sum writes it), verified when it is read
    step_0000500/state.pt         optimizer (full, keyed by parameter name), grad scaler, next step, best validation
                                  loss, RNG and loader states
    step_0000500/config.json      the resolved config
    step_0000500/tokenizer.json   the dataset's tokenizer (what sample.py decodes with)
    best.json                     which step had the best validation loss (that folder is never pruned)

Everything loads with safetensors or `torch.load(weights_only=True)`. Full (gathered) state dicts make a
checkpoint independent of how it was trained: one process, DDP or FSDP on any number of ranks.
"""
import dataclasses
import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, LLMconfig, eval_int_expr
from .config.fields import model_config_from_dict
from .files import write_atomically, write_folder_atomically
from .model import LLM, build_model
from .validate import validate_saved

STEP_FOLDER = re.compile(r"step_(\d+)")
STATE_FILE = "state.pt"
CHECKSUM_FILE = "weights.sha256"  # the weights file's SHA-256, written beside it at save time
# Train settings that change the trajectory: a resumed run must use the same ones (and the same global micro-batch,
# batch_size x ranks, which may be split over another number of ranks).
TRAJECTORY_FIELDS = ("dataset", "data_mix", "data_order", "learning_rate", "min_lr", "warmup_steps", "beta1", "beta2",
                     "weight_decay", "grad_clip", "dtype", "seed")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_folder(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint taken after `step` optimizer steps."""
    return checkpoints_dir(run_dir) / f"step_{step:07d}"


def folder_step(folder: Path) -> int:
    """The step of a step folder's name."""
    return int(STEP_FOLDER.fullmatch(folder.name).group(1))


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The complete step folders of a run, oldest first (unfinished `.tmp` folders are ignored)."""
    folder = checkpoints_dir(run_dir)
    found = [p for p in folder.iterdir() if STEP_FOLDER.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=folder_step)


def read_json(path: Path, fix: str) -> dict:
    """A JSON object file, or a one-line error naming the file, what is wrong with it and `fix`."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing; {fix}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object; {fix}")
    return data


def best_step(run_dir: Path) -> int | None:
    """The step that best.json marks as having the best validation loss, or None without one."""
    path = checkpoints_dir(run_dir) / "best.json"
    if not path.is_file():
        return None
    step = read_json(path, "delete it (the newest checkpoint then counts as the best)").get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ConfigError(f"{path} has no integer 'step'; delete it (the newest checkpoint then counts as the best)")
    return step


def is_checkpoint(folder: Path) -> bool:
    """Whether a folder is a checkpoint (it holds weights), as opposed to a run folder."""
    return folder.is_dir() and any(folder.glob("*.safetensors"))


TIED = ("lm_head.weight", "tok_emb.weight")  # the output head may share the token embedding


def save_checkpoint(run_dir: Path, step: int, weights: dict, state: dict, config: dict, tokenizer: dict,
                    file_name: str, keep_last: int, interval: int, best_val: float | None = None) -> Path:
    """Writes the checkpoint taken after `step` optimizer steps (a full model state dict and the training state),
    marks it best when `best_val` is given, and prunes the others: a checkpoint between two multiples of `interval`
    (a best one, or the end of an earlier run) is kept only while it is the best, so every interval holds at most
    one checkpoint besides the best; of the rest, the last keep_last stay."""
    path = step_folder(run_dir, step)
    head, embedding = TIED
    if head in weights and embedding in weights and weights[head].data_ptr() == weights[embedding].data_ptr():
        weights = {k: v for k, v in weights.items() if k != head}  # stored once; read_weights restores it

    def write(tmp: Path) -> None:
        weights_file = tmp / f"{file_name}.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(weights_file))
        (tmp / CHECKSUM_FILE).write_text(f"{file_sha256(weights_file)}  {weights_file.name}\n")  # sha256sum's format
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer))

    write_folder_atomically(path, write)
    if best_val is not None:
        mark_best(run_dir, step, best_val)
    best = best_step(run_dir)
    found = step_checkpoints(run_dir)
    regular = [p for p in found if folder_step(p) % interval == 0 or folder_step(p) == step]
    kept = set(regular[-keep_last:])
    for old in found:
        if old not in kept and folder_step(old) != best:
            shutil.rmtree(old)
    return path


def mark_best(run_dir: Path, step: int, val_loss: float) -> None:
    """Records that the checkpoint of `step` has the best validation loss so far."""
    text = json.dumps({"step": step, "val_loss": val_loss})
    write_atomically(checkpoints_dir(run_dir) / "best.json", lambda tmp: tmp.write_text(text))


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint folder `--resume` names: latest (this run's newest), auto (the same, or None when the run has
    none), a checkpoint folder, or a run folder."""
    where = run_dir if resume in ("latest", "auto") else Path(resume)
    if is_checkpoint(where):
        return where
    found = step_checkpoints(where)
    if not found and resume == "auto":
        return None
    if not found:
        raise ConfigError(f"--resume={resume}: no checkpoint in {where}; pass a checkpoint or run folder, or drop --resume")
    return found[-1]


def layer_differences(saved: list[dict], current: list[dict]) -> list[tuple[str, object, object]]:
    """(name, saved, current) for each layer field that differs, as `layers[2].n_head`, or `layers[*].n_head` when
    every layer changed it the same way; nothing when the layer count differs (n_layer says so)."""
    if len(saved) != len(current):
        return []
    changed: dict[tuple, list[int]] = {}
    for i, (old, new) in enumerate(zip(saved, current)):
        for key, value in new.items():
            if old.get(key) != value:
                changed.setdefault((key, old.get(key), value), []).append(i)
    return [(f"layers[{layer_set(layers, len(current))}].{key}", old, new)
            for (key, old, new), layers in changed.items()]


def layer_set(layers: list[int], count: int) -> str:
    """'*' when the indices cover all `count` layers, else the indices joined by commas."""
    return "*" if len(layers) == count else ",".join(map(str, layers))


def config_differences(saved: dict, saved_ranks: int, current: dict, ranks: int) -> list[str]:
    """'name: saved -> current' for every model field (the attention kernel aside), trajectory field and global
    micro-batch that differ. The saved model is read as a config first, so fields added since it was written take
    their defaults and older spellings (`moe`) their current form."""
    saved_model = dataclasses.asdict(model_config_from_dict(saved["model"], "checkpoint config.json model"))
    pairs = [(k, saved_model.get(k), v) for k, v in current["model"].items() if k not in ("attn_backend", "layers")]
    pairs += layer_differences(saved_model["layers"], current["model"]["layers"])
    pairs += [(k, saved["train"].get(k), current["train"][k]) for k in TRAJECTORY_FIELDS]
    pairs += [("tokens per step", tokens_per_step(saved, saved_ranks), tokens_per_step(current, ranks))]
    differences = [f"{name}: {old!r} -> {new!r}" for name, old, new in pairs if old != new]
    old_batch, new_batch = saved["train"]["batch_size"], current["train"]["batch_size"]
    if old_batch * saved_ranks != new_batch * ranks:
        differences.append(f"batch_size x ranks: {old_batch} x {saved_ranks} -> {new_batch} x {ranks}")
    return differences


def tokens_per_step(config: dict, ranks: int) -> int:
    """The tokens of one optimizer step of a saved config: its total_batch_size_str expression ('2**11' and '2048'
    are the same), or unset one micro-batch per rank."""
    train, block_size = config["train"], config["model"]["block_size"]
    if train.get("total_batch_size_str") is None:
        return train["batch_size"] * block_size * ranks
    return eval_int_expr(train["total_batch_size_str"], "total_batch_size_str")


def best_or_latest(path: Path) -> Path:
    """A checkpoint folder as given, or a run folder's best checkpoint (its newest when none was marked best)."""
    if is_checkpoint(path):
        return path
    if not path.is_dir():
        raise ConfigError(f"--ckpt={path}: no such folder; pass a run folder (out/RUN) or a checkpoint folder")
    best = best_step(path)
    if best is not None and step_folder(path, best).is_dir():
        return step_folder(path, best)
    found = step_checkpoints(path)
    if not found:
        raise ConfigError(f"--ckpt={path}: no checkpoint there (was the run trained with --no_save_model?); "
                          "pass a run folder (out/RUN) or a checkpoint folder")
    return found[-1]


def read_saved_config(folder: Path) -> dict:
    """A checkpoint's config.json, checked to hold the model and run sections."""
    fix = "it is not a checkpoint written by this trainer, or the file is damaged: use another checkpoint"
    saved = read_json(folder / "config.json", fix)
    for section in ("model", "train"):
        if not isinstance(saved.get(section), dict):
            raise ConfigError(f"{folder / 'config.json'} has no {section!r} section; {fix}")
    return saved


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path) -> dict:
    """The checkpoint folder's full model state dict (a tied output head shares the embedding again), checked
    against the checksum recorded when it was saved (checkpoints written before checksums were recorded have none)
    and for non-finite values."""
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise ConfigError(f"checkpoint {path} should hold one .safetensors file, found {len(files)}")
    try:
        weights = load_file(str(files[0]))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{files[0]} is damaged or truncated ({e}); use another checkpoint of the run") from None
    recorded = path / CHECKSUM_FILE
    if recorded.is_file() and recorded.read_text().split()[:1] != [file_sha256(files[0])]:
        raise ConfigError(f"{files[0]} is damaged: its bytes differ from the checksum recorded in {CHECKSUM_FILE} when "
                          "it was saved; use another checkpoint of the run")
    bad = next((name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ConfigError(f"{files[0]}: {bad} holds NaN or infinite values; use another checkpoint of the run")
    head, embedding = TIED
    if head not in weights and embedding in weights:
        weights[head] = weights[embedding]
    return weights


STATE_KEYS = ("step", "optimizer", "scaler", "rng", "loaders", "best_val_loss")


def read_state(path: Path) -> dict:
    """A checkpoint's training state (state.pt), or a one-line error saying why it cannot be resumed from."""
    file = path / STATE_FILE
    fix = "resume from an earlier checkpoint of the run (--resume RUN/checkpoints/step_N)"
    if not file.is_file():
        raise ConfigError(f"{file} is missing: the checkpoint has weights but not the optimizer and loader state a "
                          f"resume needs; {fix}")
    try:
        state = torch.load(file, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:  # torch's messages run long
        raise ConfigError(f"{file} is damaged or truncated (torch.load raised {type(e).__name__}); {fix}") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(f"{file} lacks {', '.join(missing)}; {fix}")
    return state


def read_checkpoint(path: Path, config: dict, ranks: int) -> tuple[dict, dict, dict]:
    """(model state dict, training state, saved config) of a checkpoint; refuses one written with another
    configuration."""
    saved = read_saved_config(path)
    state = read_state(path)
    differences = config_differences(saved, state.get("world_size", 1), config, ranks)
    if differences:
        raise ConfigError(f"checkpoint {path} was written with a different config ({'; '.join(differences)}); "
                          f"pass the same flags or --config {path / 'config.json'}")
    return read_weights(path), state, saved


def weight_mismatches(expected: dict, weights: dict) -> list[str]:
    """What keeps `weights` from loading into a model whose state dict is `expected`: missing, unexpected and
    differently shaped tensors (the first few of each)."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in weights and weights[k].shape != v.shape]
    found = [("missing", missing), ("unexpected", unexpected), ("shape (weights vs config)", shapes)]
    return [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}" for label, items in found if items]


def trained_config(ckpt: str, **overrides) -> tuple[Path, LLMconfig]:
    """(checkpoint folder, model config) of the checkpoint load_trained reads, with the same overrides."""
    folder = best_or_latest(Path(ckpt))
    saved = read_saved_config(folder)
    config = model_config_from_dict(saved["model"], f"{folder}/config.json model")
    config = dataclasses.replace(config, **{"attn_backend": "auto", **overrides})  # its kernel may not be here
    validate_saved(config, f"{folder}/config.json")
    return folder, config


def load_trained(ckpt: str, **overrides) -> tuple[Path, LLM, dict]:
    """(checkpoint folder, model in eval mode on the CPU, tokenizer meta) for a run or checkpoint folder, as sampling,
    export and fine-tuning use it: the best checkpoint of a run (else its newest), built from its own config.json
    with the attention kernel auto and the model fields in `overrides` (dropout, attn_backend) replaced. Only the
    weights, config.json and tokenizer.json are read: the training state may be missing."""
    folder, config = trained_config(ckpt, **overrides)
    model = build_model(config)
    weights = read_weights(folder)
    mismatches = weight_mismatches(model.state_dict(), weights)
    if mismatches:
        raise ConfigError(f"{folder}: config.json does not describe the weights ({'; '.join(mismatches)}); "
                          "the files come from different checkpoints")
    model.load_state_dict(weights)
    tokenizer = read_json(folder / "tokenizer.json", "copy it from another checkpoint of the run")
    return folder, model.eval(), tokenizer
