"""Sweeps: a grid of train.py runs over any flags and seeds, run through submitit on this machine (N at a time) or on
SLURM, each in a run directory named by what differs. Rerunning the same sweep skips the finished runs and continues
the others from their checkpoints (every run gets --resume auto).

    python -m llm.sweep --grid attn=mha,gqa,mla --grid ffn=dense,moe --seeds 0,1 --name ablation --max_iters 500
    python -m llm.sweep --file sweep.yaml --parallel 2 --dry_run
    python -m llm.report out/ablation/*
"""
import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from .bench import split_argv
from .cli import parse
from .config import (
    BlockConfig,
    ConfigError,
    LLMconfig,
    Trainconfig,
    exit_on_user_error,
    run_dir_name,
    total_batch_tokens,
)
from .config.fields import did_you_mean, known_fields
from .data.prepare import SHIPPED_DATASETS, prepare_shipped
from .formats import load_mapping

SWEPT_BY_THE_SWEEP = ("out_dir", "wandb_run_name", "resume", "seed")  # set per run: not a grid field or fixed flag
OTHER_FLAGS = ("preset", "config", "layer_configs", "layer_configs_jsonl", "moe", "recurrent_depth")


@dataclass
class SweepOptions:
    """Run a grid of train.py runs. Every other flag is train.py's, given to every run (python train.py --help)."""

    grid: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """--grid FIELD=V1,V2,... (repeatable): a train.py field and its values; the runs are every combination."""
    seeds: str | None = None
    """Seeds, as 0,1,2: each combination runs once per seed (unset: train.py's --seed)."""
    file: str | None = None
    """A YAML or JSON sweep file: `flags` (fixed for every run), `grid` ({field: [values]}), `variants` (named flag
    sets, crossed with the grid) and `seeds`; --grid, --seeds and flags given here add to it."""
    name: str = "sweep"
    """The sweep's name: its runs go to OUT_DIR/NAME/RUN."""
    out_dir: str = "out"
    """Where the sweep's folder is made."""
    executor: Literal["local", "slurm"] = "local"
    """local: runs on this machine, --parallel at a time; slurm: one SLURM job per run."""
    parallel: int = 1
    """local: runs at a time; each gets cores / parallel threads so that they do not oversubscribe the cores."""
    gpus: int = 0
    """GPUs per run; a run on more than one is launched through torchrun (one process per GPU)."""
    partition: str | None = None
    """slurm: the partition."""
    time_min: int = 240
    """Time limit of each run in minutes (slurm: the job's --time; local: the job is killed after it)."""
    cpus_per_run: int | None = None
    """slurm: CPUs per job (--cpus-per-task)."""
    match: Literal["none", "flops", "tokens", "params"] = "none"
    """Match every run to the first: flops and tokens set each run's --max_iters so that it spends the first run's
    training FLOPs (each model's own FLOPs per token, which count its kind's token mixing) or sees its tokens,
    whatever its size or batch; params sets each run's --n_embd so that its total parameters are nearest the first
    run's."""
    dry_run: bool = False
    """List the runs (parameters, tokens, training FLOPs, memory per device, state) and exit."""


@dataclass
class Run:
    """One run of the sweep: its directory name, its train.py flags and the values that set it apart."""

    name: str
    argv: list[str]
    differs: dict[str, str]


def as_flags(values: dict, where: str) -> list[str]:
    """{field: value} as train.py flags: true -> --field, false -> --no_field, a list -> --field v1 v2."""
    argv = []
    for name, value in values.items():
        check_field(str(name), where)
        if value is True or value is False:
            argv.append(f"--{name}" if value else f"--no_{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{name}", json.dumps(value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


def check_field(name: str, where: str) -> None:
    """Refuses a name that is no train.py field, or one that the sweep sets itself."""
    fields = [*known_fields(LLMconfig), *known_fields(BlockConfig), *known_fields(Trainconfig), *OTHER_FLAGS]
    if name in SWEPT_BY_THE_SWEEP:
        raise ConfigError(f"{where}: {name} is set by the sweep for each run; "
                          + ("use --seeds" if name == "seed" else "use the sweep's --name/--out_dir"))
    if name not in fields:
        raise ConfigError(f"{where}: {name!r} is not a train.py field{did_you_mean(name, fields)}")


def shown(value) -> str:
    """A flag value as text: lists and mappings as JSON, true and false in lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def grid_option(text: str) -> tuple[str, list[str]]:
    """'FIELD=V1,V2' -> (field, [values])."""
    name, sep, values = text.partition("=")
    name = name.strip().removeprefix("--").replace("-", "_")
    if not sep or not name or not values:
        raise ConfigError(f"--grid {text!r} is not FIELD=V1,V2,...; e.g. --grid attn=mha,gqa (a sweep file takes "
                          "values that hold commas)")
    check_field(name, f"--grid {text}")
    return name, [v.strip() for v in values.split(",")]


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a list of integers such as 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} repeats a seed")
    return seeds


def read_sweep_file(path: str) -> dict:
    """The sweep file's sections, checked."""
    data = load_mapping(path)
    unknown = sorted(set(data) - {"flags", "grid", "variants", "seeds"})
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}; use flags, grid, variants and seeds")
    for section in ("flags", "grid", "variants"):
        if not isinstance(data.get(section) or {}, dict):
            raise ConfigError(f"{path}: {section} must be a mapping")
    for name, values in (data.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{name} must be a non-empty list of values")
    for name, values in (data.get("variants") or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: variants.{name} must be a mapping of flags")
    seeds = data.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{path}: seeds must be a list of integers")
    return data


def plan(opts: SweepOptions, fixed: list[str]) -> list[Run]:
    """The sweep's runs: variants x grid x seeds, each named by the values that differ between the runs."""
    spec = read_sweep_file(opts.file) if opts.file else {}
    where = opts.file or "the sweep"
    fixed = as_flags(spec.get("flags") or {}, f"{where} flags") + fixed
    grid = {name: list(values) for name, values in (spec.get("grid") or {}).items()}
    for text in opts.grid:
        name, values = grid_option(text)
        grid[name] = values
    for name in grid:
        check_field(name, f"{where} grid")
    variants = spec.get("variants") or {"": {}}
    seeds = seed_list(opts.seeds) if opts.seeds else spec.get("seeds") or [None]
    runs = []
    for variant, combination, seed in itertools.product(variants, itertools.product(*grid.values()), seeds):
        values = dict(zip(grid, combination))
        differs = {"variant": variant} if len(variants) > 1 else {}
        differs |= {name: "x".join(map(shown, value)) if isinstance(value, list) else shown(value)
                    for name, value in values.items() if len(grid[name]) > 1}  # [8, 8] reads 8x8
        if len(seeds) > 1:
            differs["seed"] = str(seed)
        name = ".".join(v if k == "variant" else f"{k}-{v}" for k, v in differs.items()) or "run"
        argv = [*fixed, *as_flags(variants[variant], f"{where} variants.{variant}"), *as_flags(values, where)]
        argv += [] if seed is None else ["--seed", str(seed)]
        runs.append(Run(run_dir_name(name), argv, differs))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two runs would share the directory {twice!r}; give values that differ in letters or digits")
    return runs


def run_argv(run: Run, opts: SweepOptions) -> list[str]:
    """train.py's flags for the run: its own, its directory, and --resume auto (finished runs are skipped before)."""
    return [*run.argv, "--out_dir", str(Path(opts.out_dir) / opts.name), "--wandb_run_name", run.name,
            "--resume", "auto"]


def resolved(run: Run, opts: SweepOptions) -> tuple[LLMconfig, Trainconfig]:
    """The run's configs through train.py's own parser and validator (its messages name the run)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parse(run_argv(run, opts))
    except ConfigError as e:
        raise ConfigError(f"run {run.name}: {e}") from None
    except SystemExit as e:  # --print_config, --estimate or --help among the fixed flags
        raise ConfigError(f"run {run.name}: a flag made train.py exit ({e.code}); drop --print_config, --estimate "
                          "and --help from the sweep's flags") from None


def state(folder: Path, max_iters: int) -> str:
    """finished (its metrics reach the last step), partial (begun) or new."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return "new"
    rows = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        last = json.loads(rows[-1])["step"] if rows else -1
    except (json.JSONDecodeError, KeyError):
        return "partial"
    return "finished" if last >= max_iters - 1 else "partial"


def figures(run: Run, opts: SweepOptions) -> tuple[float, int, int, int]:
    """(training FLOPs per token, tokens per step, max_iters, total parameters) of a run, from the preflight's model
    of fake tensors."""
    from .train.preflight import model_figures

    model_config, cfg = resolved(run, opts)
    flops, (total, _) = model_figures(model_config, cfg)
    return flops, total_batch_tokens(cfg, model_config, max(1, opts.gpus)), cfg.max_iters, total


WIDTH_STEP = 8  # --match params tries widths in steps of this many


def match_width(run: Run, target: int, opts: SweepOptions) -> int:
    """The n_embd (a multiple of WIDTH_STEP up to four times the run's own) whose model has the parameter count
    nearest to target; widths that the run's other fields do not allow (heads that do not divide it) are passed
    over."""
    width = resolved(run, opts)[0].n_embd
    best = None
    for candidate in range(WIDTH_STEP, 4 * max(width, WIDTH_STEP) + 1, WIDTH_STEP):
        trial = Run(run.name, [*run.argv, "--n_embd", str(candidate)], run.differs)
        try:
            total = figures(trial, opts)[3]
        except ConfigError:
            continue
        if best is None or abs(total - target) < abs(best[1] - target):
            best = (candidate, total)
        if total > target:
            break
    if best is None:
        raise ConfigError(f"--match params: no width from {WIDTH_STEP} to {4 * width} is valid for run {run.name}")
    return best[0]


def match_budgets(runs: list[Run], opts: SweepOptions) -> None:
    """--match: gives each run the --max_iters that spends the first run's training FLOPs or sees its tokens (the
    nearest whole number of steps, so budgets agree within one step's worth), or (params) the n_embd whose total
    parameters are nearest the first run's; says what it set."""
    flops, per_step, steps, params = figures(runs[0], opts)
    if opts.match == "params":
        print(f"--match params: every run gets about {params:,} parameters, those of {runs[0].name}")
        for run in runs:
            if any(arg.removeprefix("--").replace("-", "_") == "n_embd" for arg in run.argv):
                raise ConfigError(f"--match params sets n_embd, but run {run.name} sets it; drop n_embd from the "
                                  "sweep's flags and grid")
        for run in runs[1:]:
            run.argv += ["--n_embd", str(match_width(run, params, opts))]
        for run in runs:
            print(f"  {run.name}: n_embd {resolved(run, opts)[0].n_embd} ({figures(run, opts)[3]:,} parameters)")
        return
    target = steps * per_step * (flops if opts.match == "flops" else 1)
    unit = "training FLOPs" if opts.match == "flops" else "tokens"
    print(f"--match {opts.match}: every run gets {target:.4g} {unit}, the budget of {runs[0].name}")
    for run in runs:
        flops, per_step, _, _ = figures(run, opts)
        cost = per_step * (flops if opts.match == "flops" else 1)  # of one step
        steps = max(1, round(target / cost))
        run.argv += ["--max_iters", str(steps)]
        print(f"  {run.name}: max_iters {steps} ({steps * cost:.4g} {unit})")


def dry_run(runs: list[Run], opts: SweepOptions) -> None:
    """Prints each run's parameters, tokens, training FLOPs, memory per device and state."""
    from .train.preflight import estimate, estimate_vocab, gib, planned_run

    print(f"{len(runs)} runs in {Path(opts.out_dir) / opts.name}:")
    print("| run | parameters (active) | tokens | training FLOPs | memory per device | state |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        model_config, cfg = resolved(run, opts)
        world = max(1, opts.gpus)
        with contextlib.redirect_stdout(io.StringIO()):
            model_config = estimate_vocab(model_config, cfg)
        e = estimate(model_config, cfg, world, planned_run(cfg)[1])
        tokens = total_batch_tokens(cfg, model_config, world) * cfg.max_iters
        folder = Path(opts.out_dir) / opts.name / run.name
        print(f"| {run.name} | {e.params[0]:,} ({e.params[1]:,}) | {tokens:,} | {e.flops_per_token * tokens:.3g} | "
              f"{gib(e.total)} | {state(folder, cfg.max_iters)} |")


@dataclass
class TrainRun:
    """One run's command, called inside its submitit job: `python -m llm` (train.py) with the run's flags, through
    torchrun on several GPUs, its output appended to the run directory's train.log. Returns (exit status, the
    reason of a failure: the log's last `error:` line, else its last line)."""

    argv: list[str]
    log: str
    gpus: int = 0
    threads: int | None = None

    def command(self) -> list[str]:
        if self.gpus > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(self.gpus), "-m", "llm", *self.argv]
        return [sys.executable, "-m", "llm", *self.argv]

    def __call__(self) -> tuple[int, str]:
        env = dict(os.environ)
        if self.threads is not None:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as out:
            process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env)
            while True:
                try:
                    status = process.wait()
                    break
                except KeyboardInterrupt:  # the job was cancelled: the run saves its checkpoint, then exits 130
                    process.send_signal(signal.SIGINT)
        lines = [line.strip() for line in Path(self.log).read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return status, (errors or lines or [""])[-1]


def make_executor(opts: SweepOptions, folder: Path):
    """The submitit executor of --executor, with the run's resources."""
    import submitit

    if opts.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=opts.time_min, gpus_per_node=opts.gpus)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError as e:  # submitit looks for srun
        raise ConfigError(f"--executor slurm: {e} (submitit needs SLURM's srun on PATH); use --executor local "
                          "here") from None
    executor.update_parameters(time=opts.time_min, gpus_per_node=opts.gpus or None, ntasks_per_node=1, nodes=1,
                               partition=opts.partition, cpus_per_task=opts.cpus_per_run, job_name=opts.name)
    return executor


def threads_per_run(opts: SweepOptions) -> int | None:
    """local with several runs at a time: this machine's cores shared among them; else torch's own choice."""
    if opts.executor != "local" or opts.parallel == 1:
        return None
    return max(1, (os.cpu_count() or 1) // opts.parallel)


def stop(running: dict) -> None:
    """Cancels the running jobs (SIGINT: each run saves a checkpoint and exits) and waits until they have ended."""
    for job in running.values():
        job.cancel()
    for job in running.values():
        while not job.done():
            time.sleep(0.2)


def execute(runs: list[Run], opts: SweepOptions) -> int:
    """Runs the unfinished runs through the executor (local: --parallel at a time); returns the sweep's exit status:
    0, 1 when a run failed, or a stopped run's 130/143 (the sweep stops with it)."""
    sweep_dir = Path(opts.out_dir) / opts.name
    pending, failed = [], []
    for run in runs:
        cfg = resolved(run, opts)[1]
        shipped = Path(cfg.data_dir) / cfg.dataset
        if cfg.dataset in SHIPPED_DATASETS and cfg.data_mix is None and not (shipped / "meta.json").is_file():
            prepare_shipped(shipped, cfg.dataset)  # once here, not by runs that start at the same time
        if state(sweep_dir / run.name, cfg.max_iters) == "finished":
            print(f"{run.name}: finished before, skipped")
        else:
            pending.append(run)
    executor = make_executor(opts, sweep_dir / ".submitit")
    at_once = opts.parallel if opts.executor == "local" else len(pending)
    running, started = {}, {}
    try:
        while pending or running:
            while pending and len(running) < at_once:
                run = pending.pop(0)
                task = TrainRun(run_argv(run, opts), str(sweep_dir / run.name / "train.log"), opts.gpus,
                                threads_per_run(opts))
                running[run.name], started[run.name] = executor.submit(task), time.perf_counter()
                print(f"{run.name}: started (job {running[run.name].job_id}; log {task.log})")
            for name, job in list(running.items()):
                if not job.done():
                    continue
                del running[name]
                try:
                    status, reason = job.result()
                except Exception as e:  # the job itself failed (killed, timed out, scheduler error)
                    status, reason = 1, (str(e).strip().splitlines() or [type(e).__name__])[-1]
                seconds = time.perf_counter() - started[name]
                if status in (130, 143):
                    print(f"{name}: stopped by a signal (exit {status}) after saving; stopping the sweep")
                    stop(running)
                    print("rerun the same command to continue the sweep")
                    return status
                if status != 0:
                    failed.append(name)
                    print(f"{name}: failed (exit {status}) after {seconds:.0f} s: {reason}")
                else:
                    print(f"{name}: finished in {seconds:.0f} s")
            time.sleep(0.2 if running else 0)
    except KeyboardInterrupt:
        stop(running)
        print("interrupted: the running runs saved their checkpoints; rerun the same command to continue",
              file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")
        return 1
    print(f"all {len(runs)} runs finished in {sweep_dir}; compare them with: python -m llm.report {sweep_dir}/*")
    return 0


VALUE_OPTIONS = {"grid", "seeds", "file", "name", "out_dir", "executor", "parallel", "gpus", "partition", "time_min",
                 "cpus_per_run", "match"}
SWITCHES = ("--dry_run", "--no_dry_run", "--dry-run", "--no-dry-run", "--help", "-h")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, fixed = split_argv(argv, VALUE_OPTIONS)  # the rest are train.py's flags, for every run
    opts = tyro.cli(SweepOptions, args=own + [a for a in fixed if a in SWITCHES], use_underscores=True)
    fixed = [a for a in fixed if a not in SWITCHES and a != "--"]
    with exit_on_user_error():
        if opts.parallel < 1 or opts.gpus < 0 or opts.time_min < 1:
            raise ConfigError(f"--parallel {opts.parallel} --gpus {opts.gpus} --time_min {opts.time_min}: use "
                              "parallel >= 1, gpus >= 0 and time_min >= 1")
        if opts.executor == "slurm" and opts.parallel != 1:
            raise ConfigError("--parallel applies to --executor local; SLURM schedules every run as its own job")
        for arg in fixed:
            name = arg.partition("=")[0].removeprefix("--").replace("-", "_")
            if arg.startswith("--") and name in SWEPT_BY_THE_SWEEP:
                check_field(name, f"--{name}")
        runs = plan(opts, fixed)
        for run in runs:
            resolved(run, opts)  # every run's flags are checked before any run starts
        if opts.match != "none":
            match_budgets(runs, opts)
            for run in runs:
                resolved(run, opts)  # a matched length may contradict a fixed flag (warmup_steps above it)
        if opts.dry_run:
            dry_run(runs, opts)
            return
        sys.exit(execute(runs, opts))


if __name__ == "__main__":
    main(sys.argv[1:])
