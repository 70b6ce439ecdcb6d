"""The run's device and numeric precision."""
from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass
class Precision:
    """Where and in which precision a run computes; fp16 comes with a gradient scaler."""

    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler | None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass, through the gradient scaler under fp16."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Brings scaled fp16 gradients back to their true size (before clipping)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; under fp16 the scaler skips steps with non-finite gradients and adapts its scale."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def pick_precision(device_name: str, dtype_name: str, local_rank: int = 0) -> Precision:
    """auto: CUDA with bf16 autocast (fp16 and a grad scaler where the GPU lacks bf16), else CPU in fp32. Under
    torchrun, `cuda` and `auto` mean this process's GPU (its local rank)."""
    cuda = torch.cuda.is_available()
    if device_name.startswith("cuda") and not cuda:
        raise ConfigError(f"device={device_name} but no CUDA GPU is visible; use --device cpu or --device auto")
    if device_name in ("auto", "cuda"):
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    else:
        device = torch.device(device_name)
    if dtype_name != "auto":
        dtype = getattr(torch, dtype_name)
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Precision(device, dtype, scaler)
