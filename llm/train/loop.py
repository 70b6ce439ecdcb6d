"""The training loop: set-up, then steps with logging, evaluation and checkpoints, in one process or on every rank
of a torchrun job. The step itself is in step.py, checkpoint decisions in checkpointer.py."""
import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import best_step, load_trained, step_folder
from ..config import ConfigError, LLMconfig, Trainconfig, config_dict, micro_steps, parse_mix, total_batch_tokens
from ..data.labels import label_rules
from ..data.loader import TokenLoader, fingerprint, read_meta
from ..data.mixture import MixtureLoader, check_same_tokenizer
from ..data.prepare import SHIPPED_DATASETS, prepare_shipped
from ..data.tokenizers import SEQUENCE_TOKENIZERS, TOKENIZER_KEYS, tokenizer_from_meta
from ..data.windows import WindowOptions
from ..denoise import default_steps
from ..files import write_atomically
from ..model import LLM, build_model
from ..model.registry import OBJECTIVES
from ..precision import Precision, pick_precision
from ..targets import Batching
from .benchmarks import EvalTask, load_eval_tasks, score_eval_tasks
from .checkpointer import Checkpointer
from .distributed import Distributed, init_distributed, wrap
from .fp8 import check_float8_device, convert_to_fp8
from .metrics import MetricsLog, StepClock, layer_metrics, peak_memory_bytes
from .mfu import mfu
from .optim import build_optimizer, set_step_hyperparameters
from .preflight import preflight
from .rundir import claim
from .step import (
    NonFiniteGuard,
    StepResult,
    estimate_loss,
    loss_of_variants,
    out_of_memory_explained,
    train_step,
)
from .window_schedule import apply_window_schedule


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


class Interrupted(SystemExit):
    """Raised once the checkpoint that a signal asked for is saved: the exit status is 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM), as shells and schedulers expect, so a sweep stops and a job is requeued."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)


class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current step; restores the handlers on exit."""

    def __enter__(self) -> "StopRequest":
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(model_config: LLMconfig, cfg: Trainconfig) -> dict:
    """Trains the model described by the configs (resuming when asked) and returns the last metrics; raises
    Interrupted after saving when SIGINT or SIGTERM stopped it.

    Under torchrun every rank runs this; rank 0 alone prints, logs and writes files.
    """
    job = init_distributed(cfg.device)
    try:
        with out_of_memory_explained(cfg, model_config.block_size):
            metrics = run(model_config, cfg, job)
    except Interrupted:
        job.close()  # every rank stopped after the same step and saved together
        raise
    except BaseException:
        if job.world_size > 1:
            torch.distributed.destroy_process_group()
        raise
    job.close()
    return metrics


@dataclass
class Session:
    """Everything one rank's run holds once it is set up."""

    cfg: Trainconfig
    job: Distributed
    precision: Precision
    model_config: LLMconfig
    model: LLM
    step_model: nn.Module  # the model as stepped: wrapped for DDP/FSDP and compiled when asked
    optimizer: torch.optim.Optimizer
    loaders: dict[str, TokenLoader | MixtureLoader]  # train, train_eval and val (a mixture: val/NAME per source)
    accum_steps: int
    tokens_per_step: int
    params: tuple[int, int]  # (total, active), counted on every rank (sharded weights need collectives)
    flops_per_token: float  # training FLOPs per token, from the model's architecture (MFU)
    checkpointer: Checkpointer
    guard: NonFiniteGuard
    eval_tasks: list[EvalTask]  # benchmarks scored at each evaluation (--eval_tasks)
    bytes_per_token: dict[str, float]  # {evaluated split: its data's bytes per token}: bits per byte are reported


def dataset_meta(cfg: Trainconfig, job: Distributed, dataset: str) -> tuple[Path, dict]:
    """The dataset folder and its meta.json; the default dataset is prepared from the shipped text when missing."""
    data = Path(cfg.data_dir) / dataset
    if dataset in SHIPPED_DATASETS and not (data / "meta.json").is_file():
        if job.is_main:
            prepare_shipped(data, dataset)
        job.barrier()
    return data, read_meta(data, dataset)


def dataset_metas(cfg: Trainconfig, job: Distributed) -> dict[str, tuple[Path, dict]]:
    """{name: (folder, meta.json)} of --dataset, or of every dataset of --data_mix (which must share a tokenizer)."""
    names = [cfg.dataset] if cfg.data_mix is None else list(parse_mix(cfg.data_mix))
    sources = {name: dataset_meta(cfg, job, name) for name in names}
    check_same_tokenizer({name: meta for name, (_, meta) in sources.items()})
    return sources


def build_loaders(sources: dict[str, tuple[Path, dict]], cfg: Trainconfig, block_size: int, device: torch.device,
                  job: Distributed, batching: Batching, windows: WindowOptions | None) -> dict:
    """The loaders: train (in --data_order), and for evaluation train_eval and val (or, for a mixture, val/NAME per
    source), each with its own seed. A mixture's loaders draw each row's source by weight."""
    eval_order = "windows" if cfg.data_order == "windows" else "random"  # windows never mix two sequences
    split_orders = {"train": ("train", cfg.data_order), "train_eval": ("train", eval_order), "val": ("val", eval_order)}

    def loader(folder: Path, meta: dict, split: str, order: str, seed: int) -> TokenLoader:
        return TokenLoader(folder / f"{split}.bin", meta["dtype"], cfg.batch_size, block_size, device, seed, order,
                           job.rank, job.world_size, batching, windows)

    if cfg.data_mix is None:
        ((folder, meta),) = sources.values()
        return {name: loader(folder, meta, split, order, cfg.seed + i)
                for i, (name, (split, order)) in enumerate(split_orders.items())}
    weights = parse_mix(cfg.data_mix)
    loaders = {}
    for i, name in enumerate(("train", "train_eval")):
        split, order = split_orders[name]
        parts = {source: loader(folder, meta, split, order, cfg.seed + 1000 * (j + 1) + i)
                 for j, (source, (folder, meta)) in enumerate(sources.items())}
        loaders[name] = MixtureLoader(parts, weights, cfg.seed + i, cfg.batch_size, device, job.rank, job.world_size,
                                      batching)
    for j, (source, (folder, meta)) in enumerate(sources.items()):
        loaders[f"val/{source}"] = loader(folder, meta, "val", eval_order, cfg.seed + 1000 * (j + 1) + 2)
    return loaders


def batch_rules(meta: dict, model_config: LLMconfig, cfg: Trainconfig) -> tuple[Batching, WindowOptions | None]:
    """How the loader makes (x, y) from the data's tokens: the objective's batching under the dataset's label rules
    (none for text tokenizers without label options, unless the objective needs them) and the window options of
    data_order windows."""
    if model_config.loss != "ce" and meta["tokenizer"] != "3mer":
        raise ConfigError(f"loss={model_config.loss} is defined on codons, but dataset {cfg.dataset!r} uses the "
                          f"{meta['tokenizer']} tokenizer; prepare it with --tokenizer 3mer or use --loss ce")
    objective = OBJECTIVES[model_config.objective]
    wraps = meta["tokenizer"] in SEQUENCE_TOKENIZERS  # each sequence in begin/end tokens, which never count
    if cfg.data_order == "windows" and not wraps:
        raise ConfigError(f"data_order=windows needs sequence data (python -m llm.data.prepare genomic), but dataset "
                          f"{cfg.dataset!r} uses the {meta['tokenizer']} tokenizer; use --data_order random or epoch")
    asked = [flag for flag, on in (("--loss_mask acgt", cfg.loss_mask != "none"),
                                   ("--uppercase_labels", cfg.uppercase_labels)) if on]
    if asked and not wraps:
        raise ConfigError(f"{asked[0]} relabels nucleotides, which needs sequence data (python -m llm.data.prepare "
                          f"genomic), but dataset {cfg.dataset!r} uses the {meta['tokenizer']} tokenizer; drop "
                          f"{asked[0]}")
    if not (wraps or objective.needs_rules):
        return objective.batching(None, cfg, model_config), None  # text without label options: the tokenizer is not even loaded
    tokenizer = tokenizer_from_meta(meta)
    batching = objective.batching(label_rules(tokenizer, cfg.loss_mask, cfg.uppercase_labels), cfg, model_config)
    if cfg.data_order != "windows":
        return batching, None
    return batching, WindowOptions(cfg.window_stride, cfg.window_specials, tokenizer.bos, tokenizer.eos, tokenizer.pad)


def bytes_per_token(sources: dict[str, tuple[Path, dict]], model_config: LLMconfig, cfg: Trainconfig,
                    is_main: bool) -> dict[str, float]:
    """{split of the evaluation: UTF-8 bytes (for sequence data: letters) per token of its dataset}, which turns a
    causal model's cross-entropy into bits per byte: train and val, or val/NAME per source of a mixture. Empty for
    other objectives and losses (not a likelihood of the text), and without the datasets whose meta.json lacks the
    figure (prepared before it was recorded; said once)."""
    if not OBJECTIVES[model_config.objective].nats_per_token or model_config.loss != "ce":
        return {}
    lacking = [name for name, (_, meta) in sources.items() if not meta.get("bytes_per_token")]
    if lacking:
        if is_main:
            print(f"dataset {lacking[0]!r} was prepared before datasets recorded their bytes per token: no bits per "
                  "byte (prepare it again with --force to have them)")
        return {}
    if cfg.data_mix is None:
        ((_, meta),) = sources.values()
        return {"train": meta["bytes_per_token"], "val": meta["bytes_per_token"]}
    return {f"val/{name}": meta["bytes_per_token"] for name, (_, meta) in sources.items()}


def check_batch_fits(loaders: dict[str, TokenLoader], cfg: Trainconfig, block_size: int, world_size: int) -> None:
    """Refuses a micro-batch (over all ranks) that holds more tokens than a split, before anything is allocated."""
    batch_tokens = cfg.batch_size * world_size * block_size
    for loader in loaders.values():
        tokens = loader.n_offsets + block_size
        if batch_tokens > tokens:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise ConfigError(f"batch_size={cfg.batch_size}{ranks} x block_size={block_size} = {batch_tokens:,} tokens "
                              f"per micro-batch is more than {loader.path} holds ({tokens:,}); lower --batch_size")


def set_up(model_config: LLMconfig, cfg: Trainconfig, job: Distributed) -> Session:
    """Data, model, optimizer and checkpointer of this rank (run() then restores a checkpoint into them)."""
    run_dir = claim(cfg, job.is_main)
    job.barrier()
    precision = pick_precision(cfg.device, cfg.dtype, job.local_rank)
    device = precision.device
    sources = dataset_metas(cfg, job)
    meta = next(iter(sources.values()))[1]
    pretrained = None
    if cfg.init_from is not None and cfg.init_from.startswith("hf:"):
        from ..hf import from_hf

        pretrained = from_hf(cfg.init_from.removeprefix("hf:"), check=cfg.import_check, dropout=model_config.dropout,
                             attn_backend=model_config.attn_backend)
        model_config = pretrained.config
    elif cfg.init_from is not None:  # a run or checkpoint of ours: its weights, a fresh optimizer and schedule
        folder, pretrained, _ = load_trained(cfg.init_from, dropout=model_config.dropout,
                                             attn_backend=model_config.attn_backend)
        pretrained.train()
        model_config = pretrained.config
        if job.is_main:
            print(f"initialised from {folder} (its architecture; a fresh optimizer, schedule and data order)")
    model_config = resolve_vocab(model_config, meta, cfg.dataset)
    if cfg.total_batch_size_str is None:  # one micro-batch per rank, written down so the run's config says so
        cfg = dataclasses.replace(cfg, total_batch_size_str=str(total_batch_tokens(cfg, model_config, job.world_size)))
        if job.is_main:
            print(f"total_batch_size_str unset: one micro-batch per rank, {cfg.total_batch_size_str} tokens per step")
    accum_steps = micro_steps(cfg, model_config, job.world_size)
    preflight(model_config, cfg, job.world_size, device, precision.dtype, job.is_main)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    batching, windows = batch_rules(meta, model_config, cfg)
    loaders = build_loaders(sources, cfg, model_config.block_size, device, job, batching, windows)
    check_batch_fits(loaders, cfg, model_config.block_size, job.world_size)
    model = (pretrained or build_model(model_config)).to(device)
    model.act_recomp = cfg.act_recomp
    model.configure_run(cfg)  # e.g. peer layers: when to report expert usage, and what counts as hot
    if cfg.fp8:
        convert_to_fp8(model, device)  # before wrapping and compiling
    if cfg.fp8_head:
        check_float8_device(device, "fp8_head")
    step_model = wrap(model, cfg.dist, precision.dtype, cfg.compile, device, job)
    if cfg.compile and not (job.world_size > 1 and cfg.dist == "fsdp"):  # FSDP compiles each block in wrap()
        if model.compiles_whole:
            step_model = torch.compile(step_model)
        else:  # a trunk whose control flow changes from step to step: each block compiles, the trunk runs eagerly
            for block in model.blocks:
                block.compile()
    optimizer = build_optimizer(model, cfg, device)
    tokenizer = {k: v for k, v in meta.items() if k in TOKENIZER_KEYS}
    checkpointer = Checkpointer(run_dir, cfg, config_dict(model_config, cfg), tokenizer, job, model, optimizer,
                                precision, loaders, {name: fingerprint(folder) for name, (folder, _) in sources.items()})
    eval_tasks = load_eval_tasks(cfg.eval_tasks, model.causal)
    return Session(cfg, job, precision, model_config, model, step_model, optimizer, loaders, accum_steps,
                   total_batch_tokens(cfg, model_config), model.get_num_params(), model.flops_per_token(), checkpointer,
                   NonFiniteGuard(device, run_dir), eval_tasks,
                   bytes_per_token(sources, model_config, cfg, job.is_main))


def open_log(s: Session, start_step: int) -> MetricsLog | None:
    """On rank 0: writes the run's config.json, prints the run's summary line and opens its metrics log (resumed
    runs drop rows past the step they continue from)."""
    if not s.job.is_main:
        return None
    run_dir, config = s.checkpointer.run_dir, s.checkpointer.config
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = json.dumps(config, indent=2)
    write_atomically(run_dir / "config.json", lambda tmp: tmp.write_text(resolved))
    total, active = s.params
    ranks = f" x {s.job.world_size} ranks ({s.cfg.dist})" if s.job.world_size > 1 else ""
    print(f"model: {total:,} parameters ({active:,} active); {s.accum_steps} micro-steps of "
          f"{s.cfg.batch_size}x{s.model_config.block_size} tokens{ranks} per step on {s.precision.device.type} "
          f"({s.precision.dtype}); run dir {run_dir}")
    wandb_run = None
    if s.cfg.wandb_log:
        import wandb

        wandb_run = wandb.init(project=s.cfg.wandb_project, name=s.cfg.wandb_run_name, config=config, dir=run_dir)
    return MetricsLog(run_dir, s.cfg.max_iters, wandb_run, resumed_at=start_step if s.cfg.resume is not None else None)


def evaluates(cfg: Trainconfig, step: int) -> bool:
    """Whether the losses are estimated after this step: once every eval_interval steps are done, as checkpoints
    are taken, and after the last step."""
    return cfg.eval and ((step + 1) % cfg.eval_interval == 0 or step == cfg.max_iters - 1)


def step_metrics(s: Session, step: int, lr: float, result: StepResult, seconds_per_step: float,
                 smoothed: float) -> dict:
    """The figures of a logged step: seconds_per_step is this interval's, `smoothed` the ETA's (StepClock). Each
    `.item()` here is a host sync, paid only on logged steps."""
    tokens_per_s = s.tokens_per_step / seconds_per_step
    metrics = {"step": step, "loss": result.loss.item() / s.accum_steps, "lr": lr,
               "grad_norm": result.grad_norm.item(), "ms_per_step": 1000 * seconds_per_step,
               "eta_s": smoothed * (s.cfg.max_iters - 1 - step), "tokens_per_s": tokens_per_s,
               "mfu": mfu(tokens_per_s / s.job.world_size, s.flops_per_token, s.precision.device),
               "flops_per_token": s.flops_per_token,
               "peak_memory_bytes": peak_memory_bytes(s.precision.device)}
    metrics.update(layer_metrics(s.model, result.aux_loss.item() / s.accum_steps, result.layer_stats))
    metrics.update({name: value.item() for name, value in result.stats.items()})
    train_loader = s.loaders["train"]
    if isinstance(train_loader, MixtureLoader):  # global tokens drawn from each source so far
        metrics.update({f"tokens/{name}": count for name, count in train_loader.tokens_seen.items()})
    if evaluates(s.cfg, step):
        validation = {k: v for k, v in s.loaders.items() if k.startswith("val")}
        variants = s.model.evaluation_variants(s.cfg)  # {suffix: context} of the architecture
        if variants:
            metrics.update(loss_of_variants(s.model, validation, variants, s.cfg.eval_iters, s.precision, s.job))
        evaluated = {"train": s.loaders["train_eval"], **validation}
        metrics.update(estimate_loss(s.model, evaluated, s.cfg.eval_iters, s.precision, s.job))
        for split, per_token in s.bytes_per_token.items():  # nats per token -> bits per byte
            metrics[f"{split}_bpb"] = metrics[f"{split}_loss"] / math.log(2) / per_token
        if s.cfg.data_mix is not None:  # the mixture's validation figures: its sources' weighted by the mix
            weights = parse_mix(s.cfg.data_mix)
            for figure in ("loss", "bpb") if s.bytes_per_token else ("loss",):
                metrics[f"val_{figure}"] = sum(w * metrics[f"val/{name}_{figure}"] for name, w in weights.items())
        metrics.update(score_eval_tasks(s.eval_tasks, s.model, s.checkpointer.tokenizer, s.precision.device))
    return metrics


def run(model_config: LLMconfig, cfg: Trainconfig, job: Distributed) -> dict:
    """The whole run on this rank: set-up and resume, then the steps with logging, evaluation and checkpoints."""
    started = time.perf_counter()
    s = set_up(model_config, cfg, job)
    start_step = s.checkpointer.restore()
    log = open_log(s, start_step)
    metrics, t0, last_logged, clock = {}, time.perf_counter(), start_step - 1, StepClock()
    if cfg.compile and job.is_main and start_step < cfg.max_iters:
        print("compiling (torch.compile): the first step takes longer while the model is compiled")
    try:
        with StopRequest() as stop:
            for step in range(start_step, cfg.max_iters):
                lr = set_step_hyperparameters(s.optimizer, s.checkpointer.schedule, cfg, step)
                s.model.before_step(step, cfg.seed)  # the same (step, seed) on every rank
                apply_window_schedule(s.model, step, cfg)
                result = train_step(s.model, s.step_model, s.loaders["train"], s.accum_steps, s.precision,
                                    s.optimizer, cfg, job)
                s.guard.record(step, result.loss)
                # Ranks must stop at the same step; agreeing on it costs a host sync per step, paid only under torchrun.
                stopping = job.any(stop.signum is not None)
                if step % cfg.log_interval == 0 or step == cfg.max_iters - 1 or stopping or evaluates(cfg, step):
                    s.guard.check()
                    seconds_per_step = (time.perf_counter() - t0) / (step - last_logged)
                    metrics = step_metrics(s, step, lr, result, seconds_per_step, clock.update(seconds_per_step))
                    if log is not None:
                        log.log(metrics)
                    s.guard.check_figures(step, metrics)  # logged as they are, then the run stops before saving
                    t0, last_logged = time.perf_counter(), step
                new_best = s.checkpointer.is_new_best(metrics, step)
                if s.checkpointer.should_save(step, new_best, stopping):
                    s.guard.check()
                    s.checkpointer.save(step + 1, new_best)
                if stopping:
                    if job.is_main:
                        print(f"stopped by a signal after step {step}; continue with --resume latest")
                    raise Interrupted(stop.signum or signal.SIGTERM)  # a rank stopped by another's signal: SIGTERM
    finally:
        if log is not None:
            log.close()
    summarise(s, metrics, start_step, time.perf_counter() - started)
    say_where_saved(s)
    return metrics


def summarise(s: Session, metrics: dict, start_step: int, seconds: float) -> None:
    """The run's summary line: steps and tokens trained in this process and the time taken, the last validation
    loss and the best one with the checkpoint that holds it."""
    if not s.job.is_main or not metrics:
        return
    steps = metrics["step"] + 1 - start_step
    line = f"trained {steps} steps, {steps * s.tokens_per_step:,} tokens, in {seconds:.0f} s"
    if "val_loss" in metrics:
        line += f"; val_loss {metrics['val_loss']:.4f}"
        if "val_ppl_bound" in metrics:  # a diffusion objective's Monte-Carlo estimate of a bound
            line += f" ± {metrics['val_loss_se']:.4f}" if "val_loss_se" in metrics else ""
            line += f" (an upper bound on the NLL per token: perplexity <= {metrics['val_ppl_bound']:.2f})"
        line += f", {metrics['val_bpb']:.4f} bits per byte" if "val_bpb" in metrics else ""
    best = best_step(s.checkpointer.run_dir) if s.cfg.save_model else None
    if best is not None and math.isfinite(s.checkpointer.best_val):
        line += f" (best {s.checkpointer.best_val:.4f}: {step_folder(s.checkpointer.run_dir, best)})"
    print(line)


def say_where_saved(s: Session) -> None:
    """The run's last line: where its checkpoint is, and how to sample from it, or that none was saved."""
    if not s.job.is_main:
        return
    if s.checkpointer.saved is None:
        print("no checkpoint saved" + ("" if s.cfg.save_model else " (--no_save_model)"))
    elif OBJECTIVES[s.model.config.objective].diffusion:
        print(f"checkpoint {s.checkpointer.saved}; sample from it by denoising with: python sample.py --ckpt "
              f"{s.checkpointer.run_dir} --steps {default_steps(s.model)}")
    elif s.model.generation_refusal() is not None:  # its objective does not generate: its reason and what to run
        print(f"checkpoint {s.checkpointer.saved}; {s.model.generation_refusal()}")
    else:
        print(f"checkpoint {s.checkpointer.saved}; sample from it with: python sample.py --ckpt {s.checkpointer.run_dir}")
