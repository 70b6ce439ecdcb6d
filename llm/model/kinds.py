"""What a kind declares: the contracts of sequence mixers, feed-forward layers, training objectives, block kinds,
head add-ons and architectures.

A kind is a name in the config (`attn`, `ffn`, `objective`, `arch`) bound to one of these records in `registry.py`
(layer kinds), `parts.py` (block kinds, head add-ons) or `arch/__init__.py` (architectures). The
record says how to build the module and how to check the config fields the kind reads; the module classes below
fix what every kind's forward pass returns, so the block, the model and the training loop never branch on a kind.
"""
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..config import BlockConfig, LLMconfig, Trainconfig
from ..targets import Batching, LabelRules


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
    generic tests run the examples under the objectives it serves; `counterpart` names the kind to suggest instead
    under the other direction (mamba: bimamba).
    `mixing_flops(block, config)` is the layer's FLOPs per token, forward and backward, that mix tokens without
    weights (attention scores and sums, a scan, an FFT convolution): what the 6 * parameters estimate of MFU misses.
    """

    name: str
    build: Callable[[BlockConfig, LLMconfig], nn.Module]
    validate: Callable[[BlockConfig, LLMconfig], None] = no_checks
    examples: dict[str, dict] = field(default_factory=dict)
    direction: str = "both"
    counterpart: str | None = None
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

    def configure_run(self, train: Trainconfig) -> None:
        """Called once before training with the run's settings (PEER: when to report expert usage); raises
        ConfigError for a setting the kind cannot honour."""

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


def same_config(config: LLMconfig, i: int) -> LLMconfig:
    """The config a layer of a single-width stack is built and checked with: the model's own."""
    return config


def no_model_checks(config: LLMconfig) -> None:
    """The model-wide validation of a kind that adds no rule."""


def no_run_checks(train: Trainconfig, config: LLMconfig) -> None:
    """The run validation of a kind that refuses no run setting."""


def never(config: LLMconfig) -> bool:
    """A predicate that holds for no config."""
    return False


@dataclass(frozen=True)
class ObjectiveKind:
    """A training objective (the model's `objective` string), end to end.

    `build(config)` returns the loss module (see objectives/token_loss.py's TokenLoss) with
    `forward(hidden (B, T, C), weight (V_padded, C), targets (B, T) or None, return_logits, token_weights (B, T) or
    None, inputs (B, T), time (B,) or None) -> (logits, loss)`:
    hidden are the final hidden states after the final norm, weight the output head's (vocab_size rows, plus
    `added_tokens`, padded to V_padded; the logits are hidden @ weight.T sliced to the objective's columns); inputs
    the token ids the model read and time the diffusion time of each row (diffusion objectives); logits (B, T,
    columns) when there are no targets or return_logits, else None; loss () when there are targets, else None; and
    the evaluation hooks `eval_logits`, `eval_sums(out, y)` and `eval_figures(sums, batches)`.
    `batching(rules, train, config)` returns how a loader's rows of tokens become (inputs, targets, extras...)
    (`targets.Batching`), under the dataset's label rules (None for text read with no rules, when `needs_rules` is
    False), the run's settings and the model's config. `causal` False makes every mixer bidirectional.
    `generation_refusal`, when set, is why the model does not generate left to right (sampling and cached decoding
    refuse it with that line);
    `diffusion` marks the kinds that sample by denoising instead (`llm.denoise`). `added_tokens` are vocabulary rows
    the objective adds after the data's (a diffusion [MASK] token at id vocab_size). `time_conditioned(config)` says
    whether the model embeds the diffusion time. `nats_per_token` says that the loss is a negative log-likelihood
    per token, or a bound on it, in nats: bits per byte are then reported. `validate(config)` checks the model
    fields; `fields` are the LLMconfig fields only this objective reads (under another they keep their defaults),
    and `validate_run(train, config)` the run settings.
    """

    name: str
    build: Callable[[LLMconfig], nn.Module]
    batching: Callable[[LabelRules | None, Trainconfig], Batching]
    causal: bool = True
    needs_rules: bool = False
    generation_refusal: str | None = None
    diffusion: bool = False
    added_tokens: int = 0
    time_conditioned: Callable[[LLMconfig], bool] = never
    nats_per_token: bool = False
    validate: Callable[[LLMconfig], None] = no_model_checks
    fields: tuple[str, ...] = ()
    validate_run: Callable[[Trainconfig, LLMconfig], None] = no_run_checks


@dataclass(frozen=True)
class ArchKind:
    """A model-level structure (the model's `arch` string): how the layers are assembled into a model.

    `build(config)` returns the model: `llm.model.llm.LLM` itself (gpt) or a subclass that overrides its hooks (see
    LLM's docstring: the blocks, the final norm and head weight, the order in which the blocks run, the generation
    cache's slots, the hooks before and after an optimizer step, FLOPs per token and extra evaluations).
    `validate(config)` checks the model-wide fields, `validate_block(block, config)` each layer (its messages are
    prefixed with where the layer was given), `validate_run(train, config)` the run settings the kind refuses.
    `fields` are the LLMconfig fields only this kind reads: under any other arch they must keep their defaults.
    `export_refusal` says why no transformers family can hold the kind (None: the families' own checks decide).
    `layer_config(config, i)` is the config layer i is built and checked with: the model's, or for a stack of
    several widths and lengths (MegaByte's global model over patches) a copy with that stage's `n_embd` and
    `block_size`.
    """

    name: str
    build: Callable[[LLMconfig], nn.Module]
    validate: Callable[[LLMconfig], None] = no_model_checks
    validate_block: Callable[[BlockConfig, LLMconfig], None] = no_checks
    validate_run: Callable[[Trainconfig, LLMconfig], None] = no_run_checks
    fields: tuple[str, ...] = ()
    export_refusal: str | None = None
    layer_config: Callable[[LLMconfig, int], LLMconfig] = same_config


@dataclass(frozen=True)
class BlockKind:
    """How one layer wraps its mixer and feed-forward kinds, when it is not the plain pre-norm `Block`.

    `claims(config, i)` says whether layer i is built by this kind; `build(block, config)` returns a module with
    Block's interface (forward, new_cache, metrics, skipped_params, mixing_flops). `validate(block, config)` checks
    each layer (it returns quietly for layers the kind does not concern), `validate_model(config)` the model-wide
    rules.
    """

    name: str
    claims: Callable[[LLMconfig, int], bool]
    build: Callable[[BlockConfig, LLMconfig], nn.Module]
    validate: Callable[[BlockConfig, LLMconfig], None] = no_checks
    validate_model: Callable[[LLMconfig], None] = no_model_checks


class HeadOutput(NamedTuple):
    """What a head add-on adds to a training forward pass."""

    aux_loss: torch.Tensor  # () added to the training loss
    layer_stats: list[dict[str, torch.Tensor]]  # per block of the add-on, its feed-forward stats
    stats: dict[str, torch.Tensor]  # model-wide figures (), logged by name


@dataclass(frozen=True)
class HeadKind:
    """A head add-on trained beside the output head (multi-token prediction), attached to the model as the
    submodule `name` when `enabled(config)`.

    `build(config)` returns a module with `forward(model, hidden (B, T, C), idx (B, T), targets (B, T), token_weights
    (B, T) or None) -> HeadOutput` (hidden: the trunk's last hidden state before the final norm; called with targets
    only) and `blocks()`: its
    blocks, whose stats follow the trunk's in ModelOutput.layer_stats. `validate(config)` checks its fields.
    """

    name: str
    enabled: Callable[[LLMconfig], bool]
    build: Callable[[LLMconfig], nn.Module]
    validate: Callable[[LLMconfig], None] = no_model_checks
