"""Data parallelism with PyTorch's own engine: DDP or FSDP2 under torchrun, nothing when run as one process."""
import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Distributed:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: dist.ProcessGroup | None = None  # a gloo group for flags held on the host (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over all ranks (in place; no host sync)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def sum_all(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over all ranks, in one all-reduce (exact for counts below 2**53)."""
        if self.world_size == 1 or not tensors:
            return tensors
        flat = self.sum(torch.cat([t.reshape(-1).double() for t in tensors]))
        return [part.view(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (every rank gets the same answer).

        The flags are summed on the host over the gloo group `control`, so agreeing waits for the other ranks'
        processes but not for work queued on any device.
        """
        if self.world_size == 1:
            return flag
        votes = torch.tensor(float(flag))
        dist.all_reduce(votes, group=self.control)
        return bool(votes.item())

    def barrier(self) -> None:
        """Waits until every rank gets here."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            dist.barrier()  # without it, a rank may abort while others still talk to it
            dist.destroy_process_group()


def init_distributed(device_name: str) -> Distributed:
    """Joins the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo") if cuda else None  # on CPU the default group is gloo already
    return Distributed(rank, world_size, local_rank, control)


def wrap(model: nn.Module, kind: str, param_dtype: torch.dtype, compile_blocks: bool, device: torch.device,
         job: Distributed) -> nn.Module:
    """The model ready for data-parallel training: DistributedDataParallel, or FSDP2 (each block sharded, then the
    root) with parameters in param_dtype for compute and gradients reduced in fp32."""
    if job.world_size == 1:
        return model
    if kind == "ddp":
        # MoE selection biases are kept equal by all-reducing the loads, not by broadcasting buffers.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    # The root returns logits sliced from the padded vocabulary (a view); nothing modifies them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def gradient_sync(model: nn.Module, kind: str, sync: bool, job: Distributed):
    """A context in which backward passes reduce gradients across ranks only when `sync` (the last micro-step)."""
    if job.world_size == 1 or sync:
        if kind == "fsdp" and job.world_size > 1:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if kind == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()
