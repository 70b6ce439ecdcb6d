"""Sampling from a discrete diffusion model (objective mdlm, sedd or d3pm): a whole window of block_size tokens is
drawn from the prior (all masks, or uniform tokens) and denoised over `steps` reverse steps of the objective's
process (`DiffusionLoss.times`, `reverse_step`, `finish`); text longer than a window continues semi-autoregressively
(MDLM's semi-AR sampler): each next window starts with the last block_size - stride tokens of the text so far, held
fixed, and denoises the stride tokens after them.

A prompt is held fixed at the start of the first window. The model is evaluated once per step, except that a model
without time conditioning reuses its last output while no token changed (MDLM's ddpm_cache).
"""
from typing import Callable

import torch

from .config import ConfigError
from .model import LLM
from .model.objectives.diffusion import DiffusionLoss
from .model.registry import OBJECTIVES

# denoiser(x (B, T), t) -> the model's output logits (B, T, columns) at time t
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def denoise_window(denoiser: Denoiser, objective: DiffusionLoss, x: torch.Tensor, fixed: torch.Tensor, steps: int,
                   generator: torch.Generator, reuse_unchanged: bool) -> tuple[torch.Tensor, int]:
    """The clean window (B, T) from x (B, T), whose positions where `fixed` (B, T) is True hold given tokens that
    never change, after `steps` reverse steps, and the number of model evaluations it took."""
    held = x.clone()
    times = objective.times(steps)
    logits, seen, calls = None, None, 0
    for t, s in zip(times[:-1], times[1:]):
        if logits is None or not reuse_unchanged or not torch.equal(x, seen):
            logits, seen, calls = denoiser(x, t), x.clone(), calls + 1
        x = torch.where(fixed, held, objective.reverse_step(logits, x, t, s, generator))  # (B, T)
    if times[-1] > 0:  # noise removal at the last time
        if not reuse_unchanged or not torch.equal(x, seen):
            logits, calls = denoiser(x, times[-1]), calls + 1
        x = torch.where(fixed, held, objective.finish(logits, x, generator))
    return x, calls


def model_denoiser(model: LLM) -> Denoiser:
    """The model as a denoiser: its logits for x at time t (the time embedding reads it when it has one)."""

    def denoiser(x: torch.Tensor, t: float) -> torch.Tensor:
        time = torch.full((x.shape[0],), t, device=x.device)
        return model(x, time=time).logits.float()  # (B, T, columns)

    return denoiser


def choose_predictor(model: LLM, predictor: str | None) -> None:
    """Sets the objective's reverse step to `predictor` (unset: its default), refusing one it does not have."""
    kind, objective = model.config.objective, model.objective
    if not OBJECTIVES[kind].diffusion:
        raise ConfigError(f"objective={kind} is not a diffusion model; --steps and --sampler apply to mdlm, sedd "
                          "and d3pm checkpoints")
    names = objective.predictors
    if predictor is not None and predictor not in names:
        raise ConfigError(f"--sampler={predictor} is not a sampler of objective={kind}; use {' or '.join(names)}")
    objective.predictor = predictor or names[0]


@torch.no_grad()
def sample(model: LLM, prompts: list[list[int]], new_tokens: int, steps: int, generator: torch.Generator,
           stride: int | None = None, predictor: str | None = None) -> tuple[list[list[int]], int]:
    """For each prompt, `new_tokens` tokens after it, denoised window by window; returns them and the number of
    model evaluations. Windows are block_size long; a prompt of block_size tokens or more is refused (it would leave
    no room to generate in the first window)."""
    objective = model.objective
    choose_predictor(model, predictor)
    window = model.config.block_size
    stride = stride or max(1, window // 2)
    longest = max(len(p) for p in prompts)
    if not 1 <= stride <= window:
        raise ConfigError(f"--stride={stride} must be in [1, block_size={window}]")
    if longest > window - 1:
        raise ConfigError(f"a prompt of {longest} tokens leaves no room in the model's window of {window} tokens; "
                          "shorten it")
    device = model.tok_emb.weight.device
    denoiser = model_denoiser(model)
    reuse = model.time_emb is None
    texts = [list(p) for p in prompts]
    total = [len(p) + new_tokens for p in prompts]
    calls = 0
    while any(len(text) < want for text, want in zip(texts, total)):
        keep = [text[max(0, len(text) - (window - stride)):] if len(text) > len(p) else text
                for text, p in zip(texts, prompts)]  # the prompt in the first window, then the last window - stride
        x = objective.prior((len(texts), window), generator, device)  # (B, W)
        fixed = torch.zeros_like(x, dtype=torch.bool)
        for row, held in enumerate(keep):
            if held:
                x[row, : len(held)] = torch.tensor(held, device=device)
                fixed[row, : len(held)] = True
        x, used = denoise_window(denoiser, objective, x, fixed, steps, generator, reuse)
        calls += used
        for row, held in enumerate(keep):
            want = total[row] - len(texts[row])
            texts[row] += x[row, len(held): len(held) + max(0, want)].tolist()
    return [text[len(p):] for text, p in zip(texts, prompts)], calls


def default_steps(model: LLM) -> int:
    """MDLM's and SEDD's 128 steps; d3pm's T (every step)."""
    return model.config.diffusion_steps if model.config.objective == "d3pm" else 128
