"""Run directories: OUT_DIR/NAME holds one run, named by --wandb_run_name.

    config.json     the run's resolved config (rewritten when the run resumes)
    metrics.jsonl   one row per logged step, this run's only
    checkpoints/    step_NNNNNNN/ folders and best.json
    wandb/          the Weights & Biases files, with --wandb_log
    nonfinite.json  written when a non-finite loss stopped the run

A new run (no --resume) never writes into a directory that holds another one: it is refused, or with --overwrite
the old run is moved aside to NAME.replaced-N (never deleted).
"""
import shutil
from pathlib import Path

from ..config import ConfigError, Trainconfig, require_folder, run_dir_name

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints")  # any of these means the directory holds a run


def run_dir(cfg: Trainconfig) -> Path:
    """The directory of the run that cfg describes."""
    return Path(cfg.out_dir) / run_dir_name(cfg.wandb_run_name)


def holds_run(folder: Path) -> bool:
    """Whether a folder holds (part of) a run."""
    return any((folder / name).exists() for name in RUN_FILES)


def continues_own_run(cfg: Trainconfig, folder: Path) -> bool:
    """Whether cfg resumes this run directory's own checkpoints (`auto`, `latest`, or a path inside it)."""
    if cfg.resume is None:
        return False
    if cfg.resume in ("auto", "latest"):
        return True
    resumed = Path(cfg.resume).resolve()
    return resumed == folder.resolve() or folder.resolve() in resumed.parents


def aside_name(folder: Path) -> Path:
    """The first free NAME.replaced-N beside the folder."""
    n = 1
    while folder.with_name(f"{folder.name}.replaced-{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}.replaced-{n}")


def claim(cfg: Trainconfig, is_main: bool) -> Path:
    """The run's directory, checked to belong to this run: a new run in a directory that holds another is refused,
    or, with --overwrite, the old run is moved aside (on rank 0). Returns the directory."""
    folder = run_dir(cfg)
    require_folder(Path(cfg.out_dir), f"--out_dir={cfg.out_dir!r}")
    require_folder(folder, f"--out_dir={cfg.out_dir!r} --wandb_run_name={cfg.wandb_run_name!r}")
    if continues_own_run(cfg, folder) or not holds_run(folder):
        return folder
    if not cfg.overwrite:
        raise ConfigError(f"{folder} already holds a run; continue it with --resume auto (or latest), pick another "
                          f"--wandb_run_name, or pass --overwrite to move it aside to {aside_name(folder)}")
    if is_main:
        aside = aside_name(folder)
        shutil.move(folder, aside)
        print(f"moved the earlier run in {folder} aside to {aside} (--overwrite)")
    return folder
