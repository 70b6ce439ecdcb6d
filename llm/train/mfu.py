"""Model FLOPs utilisation: training FLOPs per token (PaLM's estimate, with each mixer's own mixing) against the
device's peak."""
import torch

from ..config import LLMconfig
from ..model.mod import routed_tokens, routes
from ..model.registry import MIXERS

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "B200": 2250e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12, "3090": 71e12,
}


def flops_per_token(config: LLMconfig, active_params: int, skipped_params: float = 0.0, core_params: int = 0) -> float:
    """6 * N for a forward and backward pass, N the active parameters, plus each layer's token mixing from its kind
    (`MixerKind.mixing_flops`): PaLM's (appendix B) 6 * N + 12 * L * n_embd * T for full attention, the window's
    keys for a sliding window, the scan for Mamba, the FFT convolutions for Hyena.

    A mixture-of-depths layer processes a fraction f = k / T of the tokens: the parameters the average token skips
    there (`skipped_params`, from LLM.skipped_params) leave N, and its mixing, over k keys for k of the T queries,
    counts f * f times (its router and predictor count in full, in N).

    Recurrent depth counts the core (core_params per iteration, adapter included, from LLM.core_params) at the mean
    recurrence: a forward pass only (a third) for the mean_recurrence - k_trunc iterations without gradients, forward
    and backward for the min(mean_recurrence, k_trunc) with them; the prelude and coda once.
    """
    mixing = [MIXERS[block.attn].mixing_flops(block, config) for block in config.layers]
    if config.recurrent_depth:
        with_grad = min(config.mean_recurrence, config.k_trunc)
        iterations = (config.mean_recurrence - with_grad) / 3 + with_grad  # in units of a forward and backward pass
        core_mixing = sum(mixing[config.n_prelude:config.n_prelude + config.n_core])
        once = 6 * (active_params - core_params) + sum(mixing) - core_mixing
        return once + iterations * (6 * core_params + core_mixing)
    for i, block in enumerate(config.layers):
        if routes(config, i):
            mixing[i] *= (routed_tokens(block.capacity, config.block_size) / config.block_size) ** 2
    return 6 * (active_params - skipped_params) + sum(mixing)


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, config: LLMconfig, active_params: int, device: torch.device,
        skipped_params: float = 0.0, core_params: int = 0) -> float | None:
    """Achieved over peak FLOP/s, or None when the peak is unknown (the parameters as for flops_per_token)."""
    peak = peak_flops(device)
    flops = flops_per_token(config, active_params, skipped_params, core_params)
    return None if peak is None else tokens_per_s * flops / peak
