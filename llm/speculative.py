"""Greedy speculative decoding with the sequential multi-token prediction modules (`sample.py --speculative`).

The output is the same as greedy decoding (`generate(..., temperature=0)`); only the number of forward passes of the
main model changes. State between rounds: the main cache holds every token but the newest one (the `pending` token,
the main model's greedy choice), and the trunk's hidden states h⁰ of the cached positions are kept. One round:
1. draft: MTP module k (k = 1..D) runs at the positions its cache lacks, up to the newest cached position t,
   combining hᵏ⁻¹ with the embedding of token t+k (the pending token, then the drafts of the depths before it), and
   its head's greedy choice at t is draft k (token t+k+1), as in training;
2. verify: one forward of the main model over [pending, draft 1..D] with the cache gives its greedy choice after
   each of them; the drafts that match those choices are accepted, and the choice after the last accepted one is the
   next pending token (so each round yields 1 to D+1 tokens);
3. roll back: the main cache keeps the accepted positions; module k's cache keeps the positions whose tokens are all
   accepted (hᵏ at position t depends on the tokens up to t+k).

Drafting stops D+1 tokens short of block_size (fewer drafts near the end, then one token per step); past it the
context slides as in `generate`, without drafts. Prompts are decoded one at a time.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError
from .generate import generate
from .model import LLM
from .model.cache import Cache, TokenCache


@dataclass
class SpeculativeStats:
    """Counts over a generation: verification forwards of the main model, drafts proposed and drafts accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def acceptance(self) -> float:
        """Fraction of the drafted tokens that were accepted."""
        return self.accepted / max(1, self.drafted)


def check_speculative(model: LLM) -> None:
    """Refuses a model that cannot draft (no sequential MTP modules) or whose caches cannot be rolled back."""
    if model.config.mtp != "sequential":
        raise ConfigError(f"--speculative drafts with the sequential multi-token prediction modules, but the "
                          f"checkpoint has mtp={model.config.mtp}; train with --mtp sequential or drop --speculative")
    layers = model.new_cache(1, max_len=1).layers
    kinds = {type(layer).__name__ for layer in layers if not isinstance(layer, TokenCache)}
    if kinds:
        raise ConfigError(f"--speculative rolls caches back, which {', '.join(sorted(kinds))} cannot; "
                          "drop --speculative")


def head_logits(model: LLM, norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab_size) of the shared output head after `norm` of hidden (B, T, C)."""
    return model.objective(norm(hidden), model.lm_head.weight, None, False)[0]


class Drafter:
    """The MTP modules' caches and their hidden states hᵏ (hidden[0] is the trunk's h⁰), for one row."""

    def __init__(self, model: LLM):
        self.model = model
        block, device, dtype = model.config.block_size, model.tok_emb.weight.device, model.tok_emb.weight.dtype
        self.modules = list(model.mtp.depths)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        self.caches = [Cache([m.block.attn.new_cache(1, block, dtype, device)], 0, zero, False) for m in self.modules]
        self.hidden = [torch.zeros(1, block, model.config.n_embd, dtype=dtype, device=device)
                       for _ in range(len(self.modules) + 1)]  # (1, block, C) each

    def draft(self, tokens: list[int], count: int) -> list[int]:
        """`count` drafted tokens after `tokens` (whose last one is pending: not in the main cache)."""
        newest, drafts = len(tokens) - 2, []  # the newest position with a hidden state h⁰
        device = self.model.tok_emb.weight.device
        for k, (module, cache) in enumerate(zip(self.modules[:count], self.caches), start=1):
            start = cache.length
            known = (tokens + drafts)[start + k: newest + k + 1]  # the token t+k of each position t in [start, newest]
            embedded = self.model.tok_emb(torch.tensor([known], device=device))  # (1, S, C)
            x = module.combine(self.hidden[k - 1][:, start:newest + 1], embedded)  # (1, S, C)
            x, _, _ = module.block(x, cache.positions(len(known)), None, cache.layers[0])  # (1, S, C)
            cache.length += len(known)
            self.hidden[k][:, start:newest + 1] = x
            drafts.append(int(head_logits(self.model, module.norm_out, x[:, -1:]).argmax(-1)))
        return drafts

    def roll_back(self, cached: int, accepted: int, count: int) -> None:
        """After a round that drafted `count` tokens past `cached` main-cache positions and accepted `accepted`:
        module k keeps its positions t with t + k <= cached + accepted (their tokens were all accepted)."""
        for k, cache in enumerate(self.caches[:count], start=1):
            cache.truncate(max(0, min(cache.length, cached + accepted - k + 1)))


@torch.no_grad()
def speculative_generate(model: LLM, prompts: list[list[int]], max_new_tokens: int, eot: int | None = None,
                         on_step: Callable[[torch.Tensor, list[int | None]], None] | None = None,
                         stats: SpeculativeStats | None = None) -> list[list[int]]:
    """Greedy decoding of each prompt (one at a time), equal to `generate(model, [prompt], ..., temperature=0)`,
    with the sequential MTP modules drafting and the main model verifying; `stats` (when given) counts the rounds."""
    check_speculative(model)
    block = model.config.block_size
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= block:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; it needs 1 to block_size={block}")
    stats = stats if stats is not None else SpeculativeStats()
    return [decode(model, list(prompt), max_new_tokens, eot, on_step, stats) for prompt in prompts]


def decode(model: LLM, tokens: list[int], max_new_tokens: int, eot: int | None,
           on_step: Callable | None, stats: SpeculativeStats) -> list[int]:
    """The new tokens after the prompt `tokens` (see `speculative_generate`)."""
    block, device = model.config.block_size, model.tok_emb.weight.device
    drafter, cache, output = Drafter(model), model.new_cache(1), []

    def emit(logits: torch.Tensor, token: int) -> bool:
        """Takes one greedy token chosen from logits (1, V); whether decoding goes on."""
        done = token == eot
        if not done:
            tokens.append(token)
            output.append(token)
        if on_step is not None:
            on_step(logits, [None if done else token])
        return not done and len(output) < max_new_tokens

    hidden, *_ = model.trunk(torch.tensor([tokens], device=device), cache)  # (1, P, C)
    drafter.hidden[0][:, :len(tokens)] = hidden
    logits = head_logits(model, model.ln_f, hidden)[:, -1]  # (1, V)
    going = emit(logits, int(logits.argmax(-1)))
    while going and cache.length < block:
        cached = cache.length
        count = min(len(drafter.modules), block - cached - 1)  # the verified tokens must fit in block_size
        drafts = drafter.draft(tokens, count)
        hidden, *_ = model.trunk(torch.tensor([tokens[-1:] + drafts], device=device), cache)  # (1, 1+count, C)
        logits = head_logits(model, model.ln_f, hidden)[0]  # (1+count, V)
        choices = logits.argmax(-1).tolist()
        accepted = next((i for i, (d, c) in enumerate(zip(drafts, choices)) if d != c), count)
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + count, stats.accepted + accepted
        cache.truncate(cached + accepted + 1)
        drafter.hidden[0][:, cached:cached + accepted + 1] = hidden[:, :accepted + 1]
        drafter.roll_back(cached, accepted, count)
        for i in range(accepted + 1):
            going = emit(logits[i:i + 1], choices[i])
            if not going:
                break
    if going:  # the cache is full: the context slides, as `generate` does past block_size
        output += generate(model, [tokens[-block:]], max_new_tokens - len(output), temperature=0, eot=eot,
                           on_step=on_step)[0]
    return output
