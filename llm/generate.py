"""Autoregressive generation: batched prompts of different lengths, a cache per layer, sampling filters.

Prompts are left-padded into one batch and prefilled together; each step then feeds one token per row. The
model sees at most block_size tokens: a longer prompt is refused, and past block_size the context slides (the
newest block_size tokens are prefilled again at every step, as recomputing a cropped context would do). A model
that streams (every layer a sliding window, RoPE positions: `LLM.streams`) goes on past block_size instead, each
layer's cache a ring of its window, as the whole sequence run through the model would.
"""
from typing import Callable

import torch

from .model import LLM
from .model.cache import Cache


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Tokens (B,) drawn from logits (B, V): greedy at temperature 0, else softmax(logits / temperature) restricted
    to the top_k most likely tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)  # mass above each
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def prefill(model: LLM, contexts: list[list[int]], max_len: int | None = None) -> tuple[torch.Tensor, Cache]:
    """Left-pads the contexts into one batch, fills a fresh cache for max_len positions (default block_size) with it,
    and returns the last logits (B, V)."""
    device = model.tok_emb.weight.device
    width = max(len(c) for c in contexts)
    pad = torch.tensor([width - len(c) for c in contexts], device=device)
    idx = torch.tensor([[0] * (width - len(c)) + c for c in contexts], device=device)  # (B, width)
    cache = model.new_cache(len(contexts), pad, max_len)
    return model(idx, cache=cache).logits[:, -1], cache


def recompute(model: LLM, contexts: list[list[int]]) -> torch.Tensor:
    """Last logits (B, V) of each context run alone through the whole model, without a cache (the reference path)."""
    device = model.tok_emb.weight.device
    return torch.cat([model(torch.tensor([c], device=device)).logits[:, -1] for c in contexts])


@torch.no_grad()
def generate(model: LLM, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eot: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_step: Callable[[torch.Tensor, list[int | None]], None] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (prompts excluded), a row stopping at the end-of-text token `eot` (not included).

    on_step(logits (B, V), new token of each row or None once it has stopped) is called after every step.
    """
    block, device = model.config.block_size, model.tok_emb.weight.device
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= block:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; it needs 1 to block_size={block}")
    rows = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    cache = None
    seen = None if model.streams else block  # the newest tokens the model sees (all of them when it streams)
    total = max(len(p) for p in prompts) + max_new_tokens  # positions a streaming model's cache may reach
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = recompute(model, [r[-seen:] if seen else r for r in rows])
        elif cache is None or cache.length == seen:
            logits, cache = prefill(model, [r[-block:] for r in rows], None if seen else total)
        else:
            logits = model(torch.tensor([[r[-1]] for r in rows], device=device), cache=cache).logits[:, -1]
        chosen = next_tokens(logits, temperature, top_k, top_p, generator).tolist()
        new: list[int | None] = []
        for i, token in enumerate(chosen):
            rows[i].append(token)
            finished[i] = finished[i] or token == eot
            new.append(None if finished[i] else token)
            if not finished[i]:
                outputs[i].append(token)
        if on_step is not None:
            on_step(logits, new)
        if all(finished):
            break
    return outputs
