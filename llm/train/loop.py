"""The training loop: accumulation, precision, clipping, schedule, evaluation, logging, checkpoints and resume,
in one process or on every rank of a torchrun job."""
import dataclasses
import json
import math
import re
import signal
import threading
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ..config import ConfigError, LLMconfig, Trainconfig, config_dict, micro_steps, total_batch_tokens
from ..data.loader import TokenLoader, read_meta
from ..data.tokenizers import TOKENIZER_KEYS
from ..files import write_atomically
from ..model import LLM
from ..checkpoint import find_checkpoint, mark_best, read_checkpoint, save_checkpoint, step_checkpoints
from .distributed import Distributed, gradient_sync, init_distributed, wrap
from .metrics import MetricsLog, layer_metrics, peak_memory_bytes
from .mfu import mfu
from .optim import build_optimizer, learning_rate
from .precision import Precision, pick_precision


def run_dir_name(run_name: str) -> str:
    """A path-safe version of a run name ('trial_run_w/o_mix' -> 'trial_run_w_o_mix')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("._") or "run"


def resolve_vocab(model_config: LLMconfig, meta: dict, dataset: str) -> LLMconfig:
    """Takes the dataset's vocabulary when vocab_size is unset; refuses one that cannot hold the data's token ids."""
    if model_config.vocab_size is None:
        return dataclasses.replace(model_config, vocab_size=meta["vocab_size"])
    largest = meta.get("max_token_id", meta["vocab_size"] - 1)
    if model_config.vocab_size <= largest:
        raise ConfigError(f"vocab_size={model_config.vocab_size} is smaller than dataset {dataset!r}'s largest token id "
                          f"{largest} (its {meta['tokenizer']} vocabulary has {meta['vocab_size']}); raise --vocab_size "
                          "or leave it unset")
    return model_config


class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current step; restores the handlers on exit."""

    def __enter__(self) -> "StopRequest":
        self.signal_name, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@torch.no_grad()
def estimate_loss(model: LLM, loaders: dict[str, TokenLoader], iters: int, precision: Precision,
                  job: Distributed) -> dict[str, float]:
    """Mean cross-entropy over `iters` global batches of each split (each rank evaluates its share)."""
    model.eval()
    losses = {}
    for split, loader in loaders.items():
        total = torch.zeros((), device=precision.device)
        for _ in range(iters):
            x, y = loader.next_batch()
            with precision.autocast():
                total += model(x, y).loss.float()
        losses[f"{split}_loss"] = job.sum(total).item() / (iters * job.world_size)
    model.train()
    return losses


def train_step(model: LLM, step_model, loader: TokenLoader, accum_steps: int, precision: Precision,
               optimizer: torch.optim.Optimizer, cfg: Trainconfig, job: Distributed):
    """One optimizer step over accum_steps micro-batches, gradients reduced across ranks on the last one only.

    Returns the objective's and the auxiliary losses summed over micro-steps and averaged over ranks, each layer's
    stats summed over the whole global batch, and the gradient norm, all left on the device.
    """
    zero = torch.zeros((), device=precision.device)
    loss_sum, aux_sum, stats = zero.clone(), zero.clone(), None
    for micro_step in range(accum_steps):
        x, y = loader.next_batch()
        with gradient_sync(step_model, cfg.dist, micro_step == accum_steps - 1, job):
            with precision.autocast():
                out = step_model(x, y)
            precision.backward((out.loss + out.aux_loss) / accum_steps)
        loss_sum += out.loss.detach().float()
        aux_sum += out.aux_loss.detach().float()
        stats = out.layer_stats if stats is None else [{k: s[k] + new[k] for k in s} for s, new in
                                                       zip(stats, out.layer_stats)]
    precision.unscale(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    stats = sum_over_ranks(stats, job)  # every rank runs the layers' hooks on the same global figures
    model.after_step(stats)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
    return job.sum(loss_sum) / job.world_size, job.sum(aux_sum) / job.world_size, stats, grad_norm


def sum_over_ranks(layer_stats: list[dict[str, torch.Tensor]], job: Distributed) -> list[dict[str, torch.Tensor]]:
    """Every layer's stats summed over all ranks, in one all-reduce."""
    names = [(i, name) for i, stats in enumerate(layer_stats) for name in stats]
    summed = job.sum_all([layer_stats[i][name] for i, name in names])
    result = [{} for _ in layer_stats]
    for (i, name), tensor in zip(names, summed):
        result[i][name] = tensor
    return result


def full_state(model: LLM, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts on the CPU, keyed by parameter name (gathered from FSDP shards)."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore(path: Path, config: dict, model: LLM, optimizer: torch.optim.Optimizer, precision: Precision,
            loaders: dict[str, TokenLoader], job: Distributed) -> tuple[int, float]:
    """Loads a checkpoint into the (possibly sharded) model, optimizer, scaler, loaders and RNG; returns the step to
    continue from and the best validation loss so far."""
    weights, state = read_checkpoint(path, config, job.world_size)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    if precision.scaler is not None and state["scaler"] is not None:
        precision.scaler.load_state_dict(state["scaler"])
    for name, loader in loaders.items():
        loader.load_state_dict(state["loaders"][name])
    torch.set_rng_state(state["rng"]["cpu"])
    if precision.device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], precision.device)
    return state["step"], state["best_val_loss"]


def train(model_config: LLMconfig, cfg: Trainconfig) -> dict:
    """Trains the model described by the configs (resuming when asked) and returns the last metrics.

    Under torchrun every rank runs this; rank 0 alone prints, logs and writes files.
    """
    job = init_distributed(cfg.device)
    try:
        metrics = run(model_config, cfg, job)
    except BaseException:
        if job.world_size > 1:
            torch.distributed.destroy_process_group()
        raise
    job.close()
    return metrics


def run(model_config: LLMconfig, cfg: Trainconfig, job: Distributed) -> dict:
    """The whole run on this rank: data, model, optional resume, then the step loop with logging and checkpoints."""
    precision = pick_precision(cfg.device, cfg.dtype, job.local_rank)
    device = precision.device
    data = Path(cfg.data_dir) / cfg.dataset
    meta = read_meta(data, cfg.dataset)
    pretrained = None
    if cfg.init_from is not None:
        from ..hf import from_hf

        pretrained = from_hf(cfg.init_from.removeprefix("hf:"), dropout=model_config.dropout,
                             attn_backend=model_config.attn_backend)
        model_config = pretrained.config
    model_config = resolve_vocab(model_config, meta, cfg.dataset)
    config = config_dict(model_config, cfg)
    tokenizer = {k: v for k, v in meta.items() if k in TOKENIZER_KEYS}
    tokens_per_step = total_batch_tokens(cfg)
    accum_steps = micro_steps(cfg, model_config, job.world_size)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    split_orders = {"train": ("train", cfg.data_order), "train_eval": ("train", "random"), "val": ("val", "random")}
    loaders = {name: TokenLoader(data / f"{split}.bin", meta["dtype"], cfg.batch_size, model_config.block_size, device,
                                 cfg.seed + i, order, job.rank, job.world_size)
               for i, (name, (split, order)) in enumerate(split_orders.items())}

    model = (pretrained or LLM(model_config)).to(device)
    model.act_recomp = cfg.act_recomp
    step_model = wrap(model, cfg.dist, precision.dtype, cfg.compile, device, job)
    if cfg.compile and not (job.world_size > 1 and cfg.dist == "fsdp"):  # FSDP compiles each block in wrap()
        step_model = torch.compile(step_model)
    optimizer = build_optimizer(model, cfg, device)
    run_dir = Path(cfg.out_dir) / run_dir_name(cfg.wandb_run_name)
    start_step, best_val = 0, math.inf
    if cfg.resume is not None:
        path = find_checkpoint(cfg.resume, run_dir)
        start_step, best_val = restore(path, config, model, optimizer, precision, loaders, job)
        if job.is_main:
            print(f"resumed from {path} at step {start_step}"
                  + (f"; nothing to train: raise --max_iters above {start_step}" if start_step >= cfg.max_iters else ""))
    total, active = model.get_num_params()
    log = None
    if job.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = json.dumps(config, indent=2)
        write_atomically(run_dir / "config.json", lambda tmp: tmp.write_text(resolved))
        ranks = f" x {job.world_size} ranks ({cfg.dist})" if job.world_size > 1 else ""
        print(f"model: {total:,} parameters ({active:,} active); {accum_steps} micro-steps of "
              f"{cfg.batch_size}x{model_config.block_size} tokens{ranks} per step on {device.type} "
              f"({precision.dtype}); run dir {run_dir}")
        wandb_run = None
        if cfg.wandb_log:
            import wandb

            wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config)
        log = MetricsLog(run_dir, wandb_run)

    def save(next_step: int, new_best: bool) -> None:
        """Gathers the full state on every rank; rank 0 writes it."""
        weights, optimizer_state = full_state(model, optimizer)
        if not job.is_main:
            return
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        state = {"step": next_step, "world_size": job.world_size, "best_val_loss": best_val, "optimizer": optimizer_state,
                 "scaler": precision.scaler.state_dict() if precision.scaler else None,
                 "rng": {"cpu": torch.get_rng_state(), "cuda": cuda_rng},
                 "loaders": {name: loader.state_dict() for name, loader in loaders.items()}}
        path = save_checkpoint(run_dir, next_step, weights, state, config, tokenizer, cfg.file_name, cfg.keep_last)
        if new_best:
            mark_best(run_dir, next_step, best_val)
        print(f"saved {path}")

    def check_finite(first_bad: torch.Tensor) -> None:
        """Stops the run at the first step whose loss was not finite, before anything is saved from it."""
        bad = int(first_bad.item())
        if bad >= 0:
            found = step_checkpoints(run_dir)
            kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved"
            raise SystemExit(f"error: the loss became NaN or infinite at step {bad}; {kept}; lower --learning_rate "
                             "or raise --warmup_steps")

    metrics, t0, last_logged = {}, time.perf_counter(), start_step - 1
    first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, tracked without a host sync
    try:
        with StopRequest() as stop:
            for step in range(start_step, cfg.max_iters):
                lr = learning_rate(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, aux_sum, layer_stats, grad_norm = train_step(model, step_model, loaders["train"], accum_steps,
                                                                     precision, optimizer, cfg, job)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_sum), step, first_bad)
                # Ranks must stop at the same step; agreeing on it costs a host sync per step, paid only under torchrun.
                stopping = job.any(stop.signal_name is not None, device)

                last = step == cfg.max_iters - 1
                if step % cfg.log_interval == 0 or last or stopping:
                    check_finite(first_bad)
                    dt = (time.perf_counter() - t0) / (step - last_logged)
                    metrics = {"step": step, "loss": loss_sum.item() / accum_steps, "lr": lr,
                               "grad_norm": grad_norm.item(), "ms_per_step": 1000 * dt,
                               "tokens_per_s": tokens_per_step / dt,
                               "mfu": mfu(tokens_per_step / dt / job.world_size, model_config, active, device),
                               "peak_memory_bytes": peak_memory_bytes(device)}
                    metrics.update(layer_metrics(model, aux_sum.item() / accum_steps, layer_stats))
                    if cfg.eval and (step % cfg.eval_interval == 0 or last):
                        evaluated = {"train": loaders["train_eval"], "val": loaders["val"]}
                        metrics.update(estimate_loss(model, evaluated, cfg.eval_iters, precision, job))
                    if log is not None:
                        log.log(metrics)
                    t0, last_logged = time.perf_counter(), step

                new_best = metrics.get("step") == step and metrics.get("val_loss", math.inf) < best_val
                if new_best:
                    best_val = metrics["val_loss"]
                if (cfg.save_model and ((step + 1) % cfg.ckpt_interval == 0 or last or new_best)) or stopping:
                    check_finite(first_bad)
                    save(step + 1, new_best and cfg.save_model)
                if stopping:
                    if job.is_main:
                        print(f"stopped by a signal after step {step}; continue with --resume latest")
                    break
    finally:
        if log is not None:
            log.close()
    return metrics
