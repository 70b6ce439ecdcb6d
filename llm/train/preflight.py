"""The preflight estimate: the model built from fake tensors (no memory) to count its parameters exactly and to record
what one training micro-batch saves for the backward pass, then the memory a training step needs on each device,
checked against the device's before anything is allocated."""
import contextlib
import dataclasses
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..checkpoint import trained_config
from ..config import ConfigError, LLMconfig, Trainconfig, parse_mix
from ..data.loader import read_meta
from ..data.prepare import SHIPPED_DATASETS, prepare_shipped
from ..data.tokenizers import KmerTokenizer
from ..model import LLM, build_model
from .optim import muon_groups

ADAM_STATE_BYTES = 8  # fp32 first and second moments per parameter
MUON_STATE_BYTES = 4  # fp32 momentum per matrix entry
MASTER_BYTES = 4  # weights and gradients stay fp32; autocast computes in the lower precision
FIX = "lower --batch_size, pass --act_recomp, shard with --dist fsdp over more ranks, or shrink the model"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class Estimate:
    """Exact parameter counts and the estimated bytes a training step holds on each device at its peak."""

    params: tuple[int, int]  # (total, active)
    flops_per_token: float  # training FLOPs per token (LLM.flops_per_token)
    weights: int
    gradients: int
    optimizer: int
    activations: int  # what one micro-batch's forward pass saves for backward
    extra: int  # copies the run makes: DDP's gradient buckets, FSDP's gathered blocks
    how: str  # the settings the activations were estimated for

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.extra

    def describe(self) -> str:
        total, active = self.params
        return (f"estimate: {total:,} parameters ({active:,} active); per device {gib(self.total)}: weights "
                f"{gib(self.weights)}, gradients {gib(self.gradients)}, optimizer {gib(self.optimizer)}, activations "
                f"{gib(self.activations)} ({self.how}), other copies {gib(self.extra)}")


@dataclass
class SavedBytes:
    """What a forward pass saves for backward: in all, and per call of each block (inside it, and its input)."""

    total: int = 0
    inside: list[int] = field(default_factory=list)  # per block call
    inputs: list[int] = field(default_factory=list)  # per block call: the bytes of its input hidden state


def saved_for_backward(model: LLM, batch: int, block_size: int, dtype: torch.dtype) -> SavedBytes:
    """Runs one training forward pass of fake tensors under the run's autocast and adds up the storage of the tensors
    autograd saves, each storage once and the parameters' not at all (autocast's low-precision copies of them are
    counted), per block call too (a model built under the same FakeTensorMode)."""
    saved = SavedBytes()
    seen = {p.untyped_storage() for p in model.parameters()}
    starts = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage not in seen:
            seen.add(storage)
            saved.total += storage.nbytes()
        return t

    def before(module, args) -> None:
        starts.append(saved.total)
        saved.inputs.append(args[0].numel() * args[0].element_size())

    def after(module, args, output) -> None:
        saved.inside.append(saved.total - starts.pop())

    hooks = [h for block in model.blocks for h in (block.register_forward_pre_hook(before),
                                                   block.register_forward_hook(after))]
    idx = torch.zeros(batch, block_size, dtype=torch.long)  # (B, T)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings(), \
                torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            warnings.simplefilter("ignore")  # e.g. kernels that a CPU lacks for bf16: this pass computes nothing
            model(idx, idx, **model.placeholder_extras(batch))
    finally:
        for hook in hooks:
            hook.remove()
    return saved


def estimate(model_config: LLMconfig, cfg: Trainconfig, world_size: int, dtype: torch.dtype) -> Estimate:
    """The estimate for this run on each of world_size ranks computing in dtype (the activations are those of the
    CPU code path; CUDA kernels such as flash attention and Mamba's fused scan save less)."""
    with FakeTensorMode():
        model = build_model(model_config)
        model.configure_run(cfg)
        model.train()
        model.before_step(0, cfg.seed)
        params, flops_per_token = model.get_num_params(), model.flops_per_token()
        saved = saved_for_backward(model, cfg.batch_size, model_config.block_size, dtype)
        matrices = sum(p.numel() for g in muon_groups(model, cfg) if g["use_muon"] for p in g["params"])
        largest_block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    total = params[0]
    # In backward, the block being differentiated also holds the gradients of its activations (about as many bytes);
    # under recomputation each block keeps only its input and the one in backward holds its insides again.
    largest_inside = max(saved.inside, default=0)
    activations = saved.total + largest_inside
    if cfg.act_recomp:
        activations += sum(saved.inputs) - sum(saved.inside) + largest_inside
    low = torch.finfo(dtype).bits // 8
    if cfg.optimizer == "muon":
        optimizer = MUON_STATE_BYTES * matrices + ADAM_STATE_BYTES * (total - matrices)
    else:
        optimizer = ADAM_STATE_BYTES * total
    weights, gradients = MASTER_BYTES * total, MASTER_BYTES * total
    if world_size > 1 and cfg.dist == "fsdp":
        weights, gradients, optimizer = weights // world_size, gradients // world_size, optimizer // world_size
        rest = total - sum(p.numel() for p in model.blocks.parameters())  # the root's: embeddings, final norm, head
        extra = (rest + 2 * largest_block) * low + (rest + largest_block) * MASTER_BYTES  # gathered, one prefetched
    else:
        extra = MASTER_BYTES * total if world_size > 1 else 0  # DDP's gradient buckets
    how = (f"micro-batch {cfg.batch_size}x{model_config.block_size}, {str(dtype).removeprefix('torch.')}"
           f"{', recomputed' if cfg.act_recomp else ''}")
    return Estimate(params, flops_per_token, weights, gradients, optimizer, activations, extra, how)


def model_figures(model_config: LLMconfig, cfg: Trainconfig) -> tuple[float, tuple[int, int]]:
    """(training FLOPs per token, (total, active) parameters) of the model a run would train, counted on a model of
    fake tensors: no memory, whatever its size."""
    with contextlib.redirect_stdout(io.StringIO()):  # a derived vocabulary says so; not here
        model_config = estimate_vocab(initial_config(model_config, cfg), cfg)
    with FakeTensorMode():
        model = build_model(model_config)
        return model.flops_per_token(), model.get_num_params()


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, where) of the memory one rank may use on device: a GPU's total memory, or this machine's physical
    memory (or its cgroup limit, when lower) shared by the ranks on this machine; None when unknown."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    limit = Path("/sys/fs/cgroup/memory.max")
    text = limit.read_text().strip() if limit.is_file() else "max"
    memory = min(physical, int(text)) if text.isdigit() else physical
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    where = f"this machine's {gib(memory)} shared by {ranks} ranks" if ranks > 1 else "this machine's memory"
    return memory // ranks, where


def check_fits(e: Estimate, device: torch.device) -> None:
    """Refuses a run whose estimate exceeds the memory of its device."""
    memory = device_memory(device)
    if memory is None or e.total <= memory[0]:
        return
    raise ConfigError(f"the run needs an estimated {gib(e.total)} per device (weights {gib(e.weights)}, gradients "
                      f"{gib(e.gradients)}, optimizer {gib(e.optimizer)}, activations {gib(e.activations)}, other "
                      f"copies {gib(e.extra)}) but has {gib(memory[0])} ({memory[1]}); {FIX}; or pass --no_memory_check "
                      "if the estimate is wrong")


def try_estimate(model_config: LLMconfig, cfg: Trainconfig, world_size: int, dtype: torch.dtype) -> Estimate | None:
    """The estimate, or None (after saying why) for a model whose forward pass does not run on fake tensors (a kind
    of one's own with data-dependent shapes)."""
    try:
        return estimate(model_config, cfg, world_size, dtype)
    except (RuntimeError, NotImplementedError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"estimate: not available, the model's forward pass does not run on fake tensors ({reason}); memory "
              "is not checked")
        return None


def preflight(model_config: LLMconfig, cfg: Trainconfig, world_size: int, device: torch.device, dtype: torch.dtype,
              is_main: bool) -> None:
    """The run's first figures: prints the estimate (rank 0) and refuses a run that would not fit (every rank)."""
    e = try_estimate(model_config, cfg, world_size, dtype)
    if e is None:
        return
    if is_main:
        print(e.describe())
    if cfg.memory_check:
        check_fits(e, device)


def planned_run(cfg: Trainconfig) -> tuple[torch.device | None, torch.dtype]:
    """The device a run would use here (None for a GPU this machine lacks) and the dtype it would compute in."""
    cuda_asked = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
    else:
        dtype = torch.bfloat16 if cuda_asked else torch.float32
    if not cuda_asked:
        return torch.device(cfg.device if cfg.device != "auto" else "cpu"), dtype
    return (torch.device(cfg.device if cfg.device != "auto" else "cuda") if torch.cuda.is_available() else None), dtype


def estimate_vocab(model_config: LLMconfig, cfg: Trainconfig) -> LLMconfig:
    """The model with the vocabulary a run would take: its own, else its (first) dataset's; the default dataset is
    prepared as training would; for a dataset not prepared yet, GPT-2's vocabulary or, under a codon loss, the
    3-mer one (said)."""
    if model_config.vocab_size is not None:
        return model_config
    dataset = cfg.dataset if cfg.data_mix is None else next(iter(parse_mix(cfg.data_mix)))
    folder = Path(cfg.data_dir) / dataset
    if dataset in SHIPPED_DATASETS and not (folder / "meta.json").is_file():
        prepare_shipped(folder, dataset)
    if (folder / "meta.json").is_file():
        return dataclasses.replace(model_config, vocab_size=read_meta(folder, dataset)["vocab_size"])
    # Codon losses read 3-mer data; other runs are estimated with GPT-2's vocabulary.
    name, vocab_size = ("3mer", KmerTokenizer(3).vocab_size) if model_config.loss != "ce" else ("GPT-2", 50257)
    print(f"vocab_size unset and dataset {dataset!r} not prepared in {cfg.data_dir}: estimated with the {name} "
          f"vocabulary ({vocab_size:,} tokens); pass --vocab_size for another")
    return dataclasses.replace(model_config, vocab_size=vocab_size)


def initial_config(model_config: LLMconfig, cfg: Trainconfig) -> LLMconfig:
    """The model a run trains: with --init_from, the architecture that comes with the weights (read without them)."""
    if cfg.init_from is None:
        return model_config
    honoured = dict(dropout=model_config.dropout, attn_backend=model_config.attn_backend)
    if cfg.init_from.startswith("hf:"):
        from ..hf import config_of  # transformers is imported only here

        return dataclasses.replace(config_of(cfg.init_from.removeprefix("hf:")), **honoured)
    return trained_config(cfg.init_from, **honoured)[1]


def print_estimate(model_config: LLMconfig, cfg: Trainconfig, ranks: int | None) -> None:
    """--estimate: the estimate for ranks (default: torchrun's WORLD_SIZE, else 1) on the device the run would use,
    and whether it fits that device here."""
    world_size = ranks or int(os.environ.get("WORLD_SIZE", "1"))
    device, dtype = planned_run(cfg)
    model_config = estimate_vocab(initial_config(model_config, cfg), cfg)
    e = try_estimate(model_config, cfg, world_size, dtype)
    if e is None:
        return
    ranks_text = f" on each of {world_size} ranks ({cfg.dist})" if world_size > 1 else ""
    print(e.describe().replace("per device", f"per device{ranks_text}", 1))
    memory = device_memory(device) if device is not None else None
    if memory is None:
        print("no such device here to compare with")
    elif e.total <= memory[0]:
        print(f"fits: {gib(e.total)} of {gib(memory[0])} ({memory[1]})")
    else:
        print(f"does not fit: {gib(e.total)} is more than {gib(memory[0])} ({memory[1]}); a run would be refused: {FIX}")
