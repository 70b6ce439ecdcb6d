"""Model FLOPs utilisation: training FLOPs per token (the model's `flops_per_token`, PaLM's estimate with each
mixer's own mixing and the architecture's own accounting) against the device's peak."""
import torch

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "B200": 2250e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12, "3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device) -> float | None:
    """Achieved over peak FLOP/s, or None when the peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else tokens_per_s * flops_per_token / peak
