"""What a layer kind declares: the contracts of sequence mixers, feed-forward layers and training objectives.

A kind is a name in the config (`attn`, `ffn`, `objective`) bound to one of these records in `registry.py`. The
record says how to build the module and how to check the config fields the kind reads; the module classes below
fix what every kind's forward pass returns, so the block, the model and the training loop never branch on a kind.
"""
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..config import BlockConfig, LLMconfig


def no_checks(block: BlockConfig, config: LLMconfig) -> None:
    """The validation of a kind that reads no field beyond the model-wide ones."""


def attention_flops(keys: int, n_head: int, qk_head_dim: int, v_head_dim: int) -> float:
    """Attention's FLOPs per query, forward and backward, over `keys` keys: scores q.k and the weighted sum of values,
    2 FLOPs per multiply-add, times 3 for the backward (PaLM, appendix B, counts every key of a causal sequence)."""
    return 6 * keys * n_head * (qk_head_dim + v_head_dim)


def full_attention_flops(block: BlockConfig, config: LLMconfig) -> float:
    """Heads of head_dim (unset: n_embd // n_head) over block_size keys, or the window's keys when the layer has one:
    PaLM's 12 * n_embd * T for full attention."""
    keys = min(block.window or config.block_size, config.block_size)
    head = block.head_dim or config.n_embd // block.n_head
    return attention_flops(keys, block.n_head, head, head)


@dataclass(frozen=True)
class MixerKind:
    """A sequence-mixer kind (the layer's `attn` string).

    `build(block, config)` returns a module with
      - `forward(x (B, T, C), positions (B or 1, T), mask (B, 1, T, S) or None, cache or None) -> (B, T, C)`:
        causal over the sequence; with a cache it continues the cached tokens and extends the cache;
      - an attribute `causal` (True when built), which the model sets to False under a bidirectional objective
        (mlm): every position then sees the whole sequence (no cache is used then);
      - `new_cache(batch, max_len, dtype, device)`: its generation cache (a `cache.TokenCache` subclass for
        per-token state, declared in the kind's file).
    `validate(block, config)` raises ConfigError (via `llm.config.require`) naming the field, value and fix.
    `examples` are small valid layer specs (with attn set) that the generic model tests run.
    `direction` says which objectives the kind serves: "both" (the model sets `causal`), "causal" (left to right
    only, e.g. a recurrent scan) or "bidirectional" (masked LM only); `validate` refuses the others, and the
    generic tests run the examples under the objectives it serves.
    `mixing_flops(block, config)` is the layer's FLOPs per token, forward and backward, that mix tokens without
    weights (attention scores and sums, a scan, an FFT convolution): what the 6 * parameters estimate of MFU misses.
    """

    name: str
    build: Callable[[BlockConfig, LLMconfig], nn.Module]
    validate: Callable[[BlockConfig, LLMconfig], None] = no_checks
    examples: dict[str, dict] = field(default_factory=dict)
    direction: str = "both"
    mixing_flops: Callable[[BlockConfig, LLMconfig], float] = full_attention_flops


class FFNOutput(NamedTuple):
    """What every feed-forward kind returns."""

    out: torch.Tensor  # (B, T, C) the layer's output, added to the residual stream
    aux_loss: torch.Tensor  # () weighted auxiliary loss, added to the training loss (0 when the kind has none)
    stats: dict[str, torch.Tensor]  # tensors that are summed over micro-steps and ranks (e.g. MoE "load" (E,))


class FeedForward(nn.Module):
    """Base class of feed-forward modules: `forward(x (B, T, C)) -> FFNOutput`.

    The hooks below have neutral defaults; a kind overrides the ones it needs. `stats` passed to them are the
    layer's FFNOutput.stats summed over all micro-steps and ranks of one optimizer step.
    """

    def after_step(self, stats: dict[str, torch.Tensor]) -> None:
        """Called once after each optimizer step (MoE: moves its selection bias)."""

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
        """This layer's figures for the metrics line and metrics.jsonl (logged as NAME/layerI)."""
        return {}

    def inactive_params(self) -> int:
        """Parameters a token does not use (MoE: the routed experts it does not pick)."""
        return 0

    def no_aux(self, out: torch.Tensor) -> FFNOutput:
        """The FFNOutput of a kind without auxiliary loss or statistics."""
        return FFNOutput(out, out.new_zeros((), dtype=torch.float32), {})


@dataclass(frozen=True)
class FFNKind:
    """A feed-forward kind (the layer's `ffn` string): `build(block, config)` returns a FeedForward;
    `validate` and `examples` as for MixerKind. `summaries` maps metrics that are also reported model-wide, as the
    maximum over this kind's layers, to their label in the console line (MoE: the worst max/mean load ratio)."""

    name: str
    build: Callable[[BlockConfig, LLMconfig], FeedForward]
    validate: Callable[[BlockConfig, LLMconfig], None] = no_checks
    examples: dict[str, dict] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveKind:
    """A training objective (the model's `objective` string): `build(config)` returns a module with
    `forward(hidden (B, T, C), weight (V_padded, C), targets (B, T) or None, return_logits) -> (logits, loss)`:
    hidden are the final hidden states after the final norm, weight the output head's (vocab_size rows padded to
    V_padded; the logits are hidden @ weight.T sliced to vocab_size); logits (B, T, vocab_size) when there are no
    targets or return_logits, else None; loss () when there are targets, else None. `causal` False makes every
    mixer bidirectional (the targets then sit at the input positions, as in masked-LM training)."""

    name: str
    build: Callable[[LLMconfig], nn.Module]
    causal: bool = True
