"""`arch: recurrent`, recurrent depth (Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning: A
Recurrent Depth Approach"): a prelude embeds the input once, a core iterated r times refines a latent state, a coda
decodes the last state. The blocks stay in the model's one list (prelude, core, coda in order); this module holds
what the recurrence adds: the adapter, the number of iterations and the order in which the blocks run.
"""
import contextlib
import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ...config import LLMconfig, Trainconfig, require
from ..kinds import ArchKind
from ..llm import LLM, RunBlock

MAX_LOG_RATE = 40.0  # e^40 iterations are far beyond any r_max: a larger tau draws r_max as well

FIELDS = ("n_prelude", "n_core", "n_coda", "mean_recurrence", "lognorm_var", "r_max", "k_trunc", "s0_std",
          "eval_recurrence", "adapter_mode")  # the LLMconfig fields only this kind reads


def sample_recurrence(config: LLMconfig, seed: int, step: int) -> int:
    """The recurrence r of training step `step`: tau ~ N(log(mean_recurrence) - lognorm_var / 2, lognorm_var),
    r = min(Poisson(e^tau) + 1, r_max). Drawn on the host from (seed, step) alone, so that every rank draws the same r
    and a resumed run the same sequence."""
    rng = np.random.default_rng([seed % 2**64, step])
    tau = rng.normal(math.log(config.mean_recurrence) - config.lognorm_var / 2, math.sqrt(config.lognorm_var))
    rate = math.exp(min(tau, MAX_LOG_RATE))
    return min(int(rng.poisson(rate)) + 1, config.r_max)


def sum_stats(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two stats dicts of one layer added name by name (a layer's figures over several iterations)."""
    return {name: a[name] + b[name] for name in a}


class RecurrentDepth(nn.Module):
    """Runs the model's blocks as prelude, core x r, coda.

    With e the prelude's output and s_0 the initial state (Gaussian noise of std s0_std in training, zeros in eval
    mode), each iteration is s_i = core(adapter([s_{i-1}; e])) (adapter_mode concat) or s_i = core(s_{i-1} + e)
    (add); the coda reads s_r. The first r - k_trunc iterations run without gradients, so backpropagation covers the
    last min(r, k_trunc) only. r is the step's draw in training (`sample_recurrence`, set by the loop before each
    step) and eval_recurrence in eval mode.
    """

    def __init__(self, config: LLMconfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.adapter = nn.Linear(2 * C, C, bias=config.bias) if config.adapter_mode == "concat" else None
        self.train_recurrence = config.mean_recurrence  # replaced before each training step
        self.eval_recurrence = config.eval_recurrence or config.mean_recurrence  # unset: the mean training r
        self.core = range(config.n_prelude, config.n_prelude + config.n_core)  # the core's block indices

    def recurrence(self) -> int:
        """r of the next forward pass in the current mode."""
        return self.train_recurrence if self.training else self.eval_recurrence

    @contextlib.contextmanager
    def evaluated_at(self, r: int) -> Iterator[None]:
        """Eval-mode forward passes inside run r iterations (the loss against r); eval_recurrence is restored after."""
        saved, self.eval_recurrence = self.eval_recurrence, r
        try:
            yield
        finally:
            self.eval_recurrence = saved

    def cached_blocks(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """The block that owns each generation-cache slot: the prelude's, the core's once per iteration of
        eval_recurrence (iteration-major), the coda's."""
        core = [blocks[i] for i in self.core]
        return list(blocks[:self.core.start]) + core * self.eval_recurrence + list(blocks[self.core.stop:])

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """s_0 (B, T, C): Gaussian noise of std s0_std in training, zeros in eval mode (deterministic evaluation,
        and the same state for a prefill and the decoding steps after it)."""
        if not self.training:
            return torch.zeros_like(e)
        return self.config.s0_std * torch.randn_like(e)  # (B, T, C)

    def core_input(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The core's input (B, T, C) from the state s and the prelude's output e, both (B, T, C)."""
        if self.adapter is None:
            return state + e
        return self.adapter(torch.cat((state, e), dim=-1))  # (B, T, 2C) -> (B, T, C)

    def forward(self, run_block: RunBlock, x: torch.Tensor, cache=None
                ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The blocks over x (B, T, C), the embedded tokens. Returns the coda's output (B, T, C), the auxiliary
        loss (), each layer's stats (a core layer's summed over the iterations) and {"rd/recurrence": r}.

        A core layer's auxiliary loss is its mean over the iterations with gradients, the last min(r, k_trunc).
        With a cache the core runs as many iterations as the cache has slots for (eval_recurrence when it was made):
        block i's slot is i in the prelude, i + iteration * n_core in the core and i + (r - 1) * n_core in the coda.
        """
        core, n_core, n_layer = self.core, len(self.core), self.config.n_layer
        r = self.recurrence() if cache is None else (len(cache.layers) - n_layer) // n_core + 1
        backprop = min(r, self.config.k_trunc)
        aux_loss, layer_stats = x.new_zeros((), dtype=torch.float32), [{} for _ in range(n_layer)]

        def run(i: int, x: torch.Tensor, slot: int, first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
            x, aux, stats = run_block(i, x, None if cache is None else cache.layers[slot])
            layer_stats[i] = stats if first else sum_stats(layer_stats[i], stats)
            return x, aux

        for i in range(core.start):
            x, aux = run(i, x, i)
            aux_loss = aux_loss + aux
        e = x  # (B, T, C) the prelude's output, read by every iteration
        state = self.initial_state(e)  # (B, T, C)
        for iteration in range(r):
            with_grad = iteration >= r - backprop
            with torch.set_grad_enabled(torch.is_grad_enabled() and with_grad):
                state = self.core_input(state, e)  # (B, T, C)
                for i in core:
                    state, aux = run(i, state, i + iteration * n_core, first=iteration == 0)
                    if with_grad:
                        aux_loss = aux_loss + aux / backprop
        x = state
        for i in range(core.stop, n_layer):
            x, aux = run(i, x, i + (r - 1) * n_core)
            aux_loss = aux_loss + aux
        return x, aux_loss, layer_stats, {"rd/recurrence": torch.full((), float(r), device=x.device)}


class RecurrentDepthLLM(LLM):
    """The recurrent-depth model: the blocks run as prelude, core x r, coda (`RecurrentDepth`); each training step
    draws its r from (seed, step); evaluation also reports the loss at each recurrence of --recurrence_sweep."""

    arch = "recurrent"
    compiles_whole = False  # r changes every step: each block compiles, the iterations run eagerly

    def add_modules(self) -> None:
        self.recurrence = RecurrentDepth(self.config)  # the adapter, r, and the order of the blocks

    def mean_depth(self) -> float:
        """n_prelude + n_core * mean_recurrence + n_coda."""
        config = self.config
        return config.n_prelude + config.n_core * config.mean_recurrence + config.n_coda

    def run_blocks(self, run_block: RunBlock, x: torch.Tensor, cache
                   ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        return self.recurrence(run_block, x, cache)  # (B, T, C), (), per layer, {"rd/recurrence": r}

    def cache_blocks(self) -> list[nn.Module]:
        return self.recurrence.cached_blocks(self.blocks)

    def before_step(self, step: int, seed: int) -> None:
        """Draws the step's r from (seed, step)."""
        self.recurrence.train_recurrence = sample_recurrence(self.config, seed, step)

    def core_params(self) -> int:
        """Active parameters one core iteration uses (its blocks and the adapter)."""
        core = [self.blocks[i] for i in self.recurrence.core]
        inactive = sum(block.ffn.inactive_params() for block in core)
        active = sum(p.numel() for block in core for p in block.parameters()) - inactive
        return active + sum(p.numel() for p in self.recurrence.parameters())

    def flops_per_token(self) -> float:
        """The prelude and coda once, the core (core_params per iteration, adapter included) at the mean recurrence:
        a forward pass only (a third) for the mean_recurrence - k_trunc iterations without gradients, forward and
        backward for the min(mean_recurrence, k_trunc) with them."""
        config, core = self.config, self.recurrence.core
        with_grad = min(config.mean_recurrence, config.k_trunc)
        iterations = (config.mean_recurrence - with_grad) / 3 + with_grad  # in units of a forward and backward pass
        mixing = [block.mixing_flops() for block in self.blocks]
        core_mixing, core_params = sum(mixing[core.start:core.stop]), self.core_params()
        once = 6 * (self.get_num_params()[1] - core_params) + sum(mixing) - core_mixing
        return once + iterations * (6 * core_params + core_mixing)

    def evaluation_variants(self, train: Trainconfig) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
        """The loss at each recurrence r of --recurrence_sweep, as SPLIT_loss_rR."""
        return {f"_r{r}": (lambda r=r: self.recurrence.evaluated_at(r)) for r in train.recurrence_sweep}


def validate(m: LLMconfig) -> None:
    """The fields in range, splitting the layers exactly; no mixture-of-depths routing inside."""
    for name, low in (("n_prelude", 0), ("n_core", 1), ("n_coda", 0), ("mean_recurrence", 1), ("r_max", 1),
                      ("k_trunc", 1)):
        value = getattr(m, name)
        require(value >= low, f"{name}={value} must be >= {low}")
    require(m.eval_recurrence is None or m.eval_recurrence >= 1,
            f"eval_recurrence={m.eval_recurrence} must be >= 1 (or unset: mean_recurrence={m.mean_recurrence})")
    require(m.lognorm_var >= 0, f"lognorm_var={m.lognorm_var} must be >= 0 (the variance of the log-normal rate)")
    require(m.s0_std >= 0, f"s0_std={m.s0_std} must be >= 0 (the standard deviation of the initial state)")
    require(not any(b.mod for b in m.layers), "arch=recurrent with mod=true layers: mixture-of-depths routing inside "
                                             "a recurrent model is not supported; drop --mod or use --arch gpt")
    split = m.n_prelude + m.n_core + m.n_coda
    require(split == m.n_layer, f"arch=recurrent splits the layers, but n_prelude={m.n_prelude} + n_core={m.n_core} + "
                                f"n_coda={m.n_coda} = {split} differs from n_layer={m.n_layer}; make them equal")


RECURRENT = ArchKind("recurrent", RecurrentDepthLLM, validate, fields=FIELDS,
                     export_refusal="arch=recurrent (a core iterated r times); the transformers families here run "
                                    "each layer once")
