"""Model FLOPs utilisation: the PaLM estimate of training FLOPs per token against the device's peak."""
import torch

from ..config import LLMconfig

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "B200": 2250e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12, "3090": 71e12,
}


def flops_per_token(config: LLMconfig, active_params: int, core_params: int = 0) -> float:
    """PaLM (appendix B): 6 * N + 12 * L * n_embd * T for a forward and backward pass, N the active parameters.

    Recurrent depth counts the core (core_params per iteration, adapter included) at the mean recurrence: a forward
    pass only (a third) for the mean_recurrence - k_trunc iterations without gradients, forward and backward for the
    min(mean_recurrence, k_trunc) with them; the prelude and coda once.
    """
    attention = 12 * config.n_embd * config.block_size  # per layer, forward and backward
    if not config.recurrent_depth:
        return 6 * active_params + config.n_layer * attention
    with_grad = min(config.mean_recurrence, config.k_trunc)
    iterations = (config.mean_recurrence - with_grad) / 3 + with_grad  # in units of a forward and backward pass
    once = 6 * (active_params - core_params) + (config.n_prelude + config.n_coda) * attention
    return once + iterations * (6 * core_params + config.n_core * attention)


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, config: LLMconfig, active_params: int, device: torch.device,
        core_params: int = 0) -> float | None:
    """Achieved over peak FLOP/s, or None when the peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else tokens_per_s * flops_per_token(config, active_params, core_params) / peak
