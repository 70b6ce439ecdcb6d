"""The run's checkpoint decisions in one object: what to resume from, when to save, which step is best."""
import dataclasses
import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint import find_checkpoint, read_checkpoint, save_checkpoint
from ..config import ConfigError, Trainconfig
from ..data.loader import TokenLoader
from ..model import LLM
from ..precision import Precision
from .distributed import Distributed
from .optim import Schedule


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the (possibly sharded) model, the optimizer,
    the grad scaler, the learning-rate schedule, the loaders' positions, the RNG states and the best validation
    loss so far.

    Every rank calls `restore` and `save` (FSDP gathers the full state); rank 0 alone writes files.
    """

    def __init__(self, run_dir: Path, cfg: Trainconfig, config: dict, tokenizer: dict, job: Distributed,
                 model: LLM, optimizer: torch.optim.Optimizer, precision: Precision,
                 loaders: dict[str, TokenLoader], data: dict[str, dict]):
        self.run_dir, self.cfg, self.config, self.tokenizer, self.job = run_dir, cfg, config, tokenizer, job
        self.model, self.optimizer, self.precision, self.loaders = model, optimizer, precision, loaders
        self.data = data  # {dataset: its fingerprint}, recorded in each checkpoint and compared on resume
        self.best_val = math.inf
        self.schedule = Schedule.of(cfg)
        self.saved: Path | None = None  # the last checkpoint written

    def restore(self) -> int:
        """Loads the checkpoint that --resume names and returns the step to continue from (0 when starting fresh).

        `auto` resumes from this run's newest checkpoint when there is one and otherwise starts fresh, so a requeued
        job can pass the same command every time; `latest` and a path insist on a checkpoint.
        """
        if self.cfg.resume is None:
            return 0
        path = find_checkpoint(self.cfg.resume, self.run_dir)
        if path is None:
            self._say(f"no checkpoint in {self.run_dir}: starting fresh (--resume auto)")
            return 0
        weights, state, saved = read_checkpoint(path, self.config, self.job.world_size)
        self.check_data(path, state.get("data"))
        set_state_dict(self.model, self.optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["loaders"][name])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.precision.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.precision.device)
        self.best_val = state["best_val_loss"]
        step = state["step"]
        done = f"; nothing to train: raise --max_iters above {step}" if step >= self.cfg.max_iters else ""
        self._say(f"resumed from {path} at step {step}{done}")
        self.schedule = self.resumed_schedule(state, saved, step)
        return step

    def check_data(self, path: Path, recorded: dict | None) -> None:
        """Refuses to resume on data other than the checkpoint's (unless --allow_data_change): the loaders' saved
        positions would land elsewhere. Checkpoints written before fingerprints were recorded pass."""
        for name, found in self.data.items():
            before = (recorded or {}).get(name, found)
            changed = [key for key in found if before.get(key) != found[key]]
            if changed and not self.cfg.allow_data_change:
                key = changed[0]
                raise ConfigError(f"dataset {name!r} differs from the one checkpoint {path} was trained on ({key}: "
                                  f"{before.get(key)} -> {found[key]}); resume on that data, or pass "
                                  "--allow_data_change to continue from the saved positions on the new data")

    def resumed_schedule(self, state: dict, saved: dict, step: int) -> Schedule:
        """The checkpoint's learning-rate schedule, continued smoothly to a changed --max_iters (checkpoints
        written before schedules were saved rebuild theirs from their config)."""
        schedule = (Schedule(**state["schedule"]) if "schedule" in state
                    else Schedule.of(dataclasses.replace(self.cfg, max_iters=saved["train"]["max_iters"])))
        if schedule.max_iters == self.cfg.max_iters or step >= self.cfg.max_iters:
            return schedule
        extended = schedule.extended(step, self.cfg.max_iters)
        self._say(f"max_iters {schedule.max_iters} -> {self.cfg.max_iters}: the learning rate goes on from "
                  f"{extended(step):.2e} at step {step} and decays to {extended.min_lr:.2e} at step {self.cfg.max_iters}")
        return extended

    def is_new_best(self, metrics: dict, step: int) -> bool:
        """Whether this step was evaluated with a validation loss below the best so far (and records it)."""
        if metrics.get("step") != step or metrics.get("val_loss", math.inf) >= self.best_val:
            return False
        self.best_val = metrics["val_loss"]
        return True

    def should_save(self, step: int, new_best: bool, stopping: bool) -> bool:
        """Save after this step: every ckpt_interval steps, at the last step and on a new best (with --save_model),
        and always when a signal stops the run."""
        last = step == self.cfg.max_iters - 1
        return stopping or (self.cfg.save_model and ((step + 1) % self.cfg.ckpt_interval == 0 or last or new_best))

    def save(self, next_step: int, new_best: bool) -> None:
        """Gathers the full state on every rank; rank 0 writes the checkpoint taken before step `next_step`."""
        weights, optimizer_state = get_state_dict(self.model, self.optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.job.is_main:
            return
        device = self.precision.device
        state = {"step": next_step, "world_size": self.job.world_size, "best_val_loss": self.best_val,
                 "optimizer": optimizer_state,
                 "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
                 "schedule": dataclasses.asdict(self.schedule),
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                 "loaders": {name: loader.state_dict() for name, loader in self.loaders.items()},
                 "data": self.data}
        path = save_checkpoint(self.run_dir, next_step, weights, state, self.config, self.tokenizer,
                               self.cfg.file_name, self.cfg.keep_last, self.cfg.ckpt_interval,
                               self.best_val if new_best and self.cfg.save_model else None)
        self.saved = path
        print(f"saved {path}")

    def _say(self, line: str) -> None:
        if self.job.is_main:
            print(line)
