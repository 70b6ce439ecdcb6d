"""The language model of the `gpt` architecture and the base of every other architecture kind: embeddings, a stack
of per-layer blocks, final norm, output head, the objective and any head add-ons."""
import contextlib
import math
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, LLMconfig, Trainconfig
from .cache import Cache
from .ffn.experts import ExpertLinear
from .kinds import FeedForward
from .mixers.attention import SlidingWindow
from .norms import build_norm
from .objectives.diffusion import TimeEmbedding
from .objectives.token_loss import TokenLoss
from .parts import HEADS, build_block
from .positions import POSITIONS
from .registry import OBJECTIVES
from .shortcuts import Shortcuts, ValueEmbeddings

VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of 64 for faster matmuls

# run_block(i, x (B, T, C), layer cache or None) -> (x (B, T, C), aux_loss (), stats) runs the model's block i
RunBlock = Callable[[int, torch.Tensor, object], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def padded_vocab_size(vocab_size: int) -> int:
    """vocab_size rounded up to a multiple of 64."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class ModelOutput(NamedTuple):
    """What the model returns: logits, the objective's loss, and the feed-forward layers' auxiliary figures."""

    logits: torch.Tensor | None  # (B, T, vocab_size) without targets or when asked for, else None
    loss: torch.Tensor | None  # () the objective's loss (mean cross-entropy) when targets are given
    aux_loss: torch.Tensor  # () sum of the layers' (and head add-ons') weighted auxiliary losses (0 when none has one)
    layer_stats: list[dict[str, torch.Tensor]]  # per layer (then per head add-on block), its feed-forward stats (MoE:
    # {"load": (E,)}; dense: {}), with the counts of its block kind added (a routed layer's tokens routed)
    stats: dict[str, torch.Tensor] = {}  # model-wide figures () averaged over micro-steps and ranks, logged by name


class LLM(nn.Module):
    """A decoder-only language model built from an `LLMconfig` and its list of per-layer specs: the `gpt`
    architecture. Build any architecture with `llm.model.build_model(config)`.

    Another architecture kind subclasses it (setting `arch`) and overrides the hooks it needs: `build_blocks`,
    `build_final_norm`, `add_modules` (its own submodules, created before the weights are initialised),
    `after_init`, `mean_depth`, `run_blocks` (the order in which the blocks run), `head_weight`, `cache_blocks`,
    `before_step`, `after_step`, `flops_per_token` and `evaluation_variants`. `compiles_whole` False makes training
    compile each block instead of the whole model (for a trunk whose control flow changes from step to step).
    """

    arch = "gpt"
    compiles_whole = True

    def __init__(self, config: LLMconfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("LLMconfig.vocab_size is unset; set it or take it from the dataset's meta.json")
        if config.arch != self.arch:
            raise ConfigError(f"{type(self).__name__} builds arch={self.arch!r}, not arch={config.arch!r}; build the "
                              "model with llm.model.build_model(config)")
        self.config = config
        self.act_recomp = False  # recompute each block's activations in backward (set by the trainer)
        kind = OBJECTIVES[config.objective]
        vocab = padded_vocab_size(config.vocab_size + kind.added_tokens)  # the objective's added ids follow the data's
        self.tok_emb = nn.Embedding(vocab, config.n_embd)
        self.pos_emb = POSITIONS[config.pos_emb](config) if config.pos_emb in POSITIONS else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = self.build_blocks()
        self.ln_f = self.build_final_norm()
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.objective = kind.build(config)
        self.causal = kind.causal
        self.time_emb = TimeEmbedding(config.n_embd) if kind.time_conditioned(config) else None
        for block in self.blocks:
            block.attn.causal = self.causal
        # Runs past block_size: every layer attends within a sliding window (its cache a ring of that window), and
        # RoPE positions have no table to run out of.
        self.streams = self.causal and config.pos_emb == "rope" and all(
            isinstance(getattr(b.attn, "window", None), SlidingWindow) and b.attn.window.size is not None
            for b in self.blocks)
        self.value_embeds = ValueEmbeddings(config, vocab) if config.value_embeds else None
        self.shortcuts = Shortcuts(config) if config.x0_mix or config.unet_skips else None
        self.add_modules()
        self.head_addons = [name for name, kind in HEADS.items() if kind.enabled(config)]  # their submodules
        for name in self.head_addons:
            self.add_module(name, HEADS[name].build(config))
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * self.mean_depth())  # GPT-2: scale residual projections by depth
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)
        if self.time_emb is not None:
            self.time_emb.start_at_zero()
        if self.value_embeds is not None:
            self.value_embeds.reset_parameters()
        self.after_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, ExpertLinear)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # the token embedding (tied: the head too) with its own std
            std = self.config.emb_init_std if module is self.tok_emb else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # ---------------------------------------------------------------- hooks of the architecture kinds

    def build_blocks(self) -> nn.ModuleList:
        """One block per layer spec, each of its block kind (llm.model.parts)."""
        return nn.ModuleList(build_block(self.config, i) for i in range(len(self.config.layers)))

    def build_final_norm(self) -> nn.Module:
        """The norm before the output head: the config's norm kind."""
        return build_norm(self.config)

    def add_modules(self) -> None:
        """Submodules of the architecture beyond blocks, norm and head; they are initialised with the rest."""

    def after_init(self) -> None:
        """Runs once the weights are initialised."""

    def mean_depth(self) -> float:
        """Layers a token passes through on average (the residual projections' init scales by it): n_layer."""
        return self.config.n_layer

    def run_blocks(self, run_block: RunBlock, x: torch.Tensor, cache: Cache | None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The blocks over the embedded tokens x (B, T, C), in order, with the shortcuts from the input when set
        (x0 mixing, U-net skips: `shortcuts.Shortcuts`). Returns the last hidden state (B, T, C), the summed
        auxiliary loss (), each layer's stats and model-wide figures (none here)."""
        aux_loss, layer_stats = x.new_zeros((), dtype=torch.float32), []
        x0, skips = x, []  # (B, T, C) the embedded input; the encoder outputs the U-net skips carry
        for i in range(len(self.blocks)):
            if self.shortcuts is not None:
                x = self.shortcuts.before_block(i, x, x0, skips)  # (B, T, C)
            x, aux, stats = run_block(i, x, None if cache is None else cache.layers[i])
            if self.shortcuts is not None:
                self.shortcuts.after_block(i, x, skips)
            aux_loss = aux_loss + aux
            layer_stats.append(stats)
        return x, aux_loss, layer_stats, {}

    def head_weight(self) -> torch.Tensor:
        """The output head's weight (V_padded, C)."""
        return self.lm_head.weight

    def cache_blocks(self) -> list[nn.Module]:
        """The block that owns each slot of the generation cache: every block once."""
        return list(self.blocks)

    def before_step(self, step: int, seed: int) -> None:
        """Before optimizer step `step` of a run seeded with `seed` (every rank calls it with the same values)."""

    def after_step(self, layer_stats: list[dict[str, torch.Tensor]]) -> None:
        """After an optimizer step, with each layer's stats summed over the step: every feed-forward layer's hook
        (MoE: the aux-free selection bias moves from the step's expert loads)."""
        for block, stats in zip(self.stat_blocks(), layer_stats, strict=True):
            block.ffn.after_step(stats)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * N for a forward and backward pass, N the active parameters less those the
        average token skips (layers that route tokens around them), plus each layer's token mixing from its kind
        (`MixerKind.mixing_flops`): PaLM's (appendix B) 6 * N + 12 * L * n_embd * T for full attention, the window's
        keys for a sliding window, the scan for Mamba, the FFT convolutions for Hyena; a routed layer's mixing counts
        (k / T)^2 of it."""
        lookups = 0 if self.value_embeds is None else self.value_embeds.lookup_params()  # tables read, not multiplied
        return (6 * (self.get_num_params()[1] - self.skipped_params() - lookups)
                + sum(b.mixing_flops() for b in self.blocks))

    def evaluation_variants(self, train: Trainconfig) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
        """Extra evaluations: {suffix: context in which eval-mode forward passes run the variant}; each split's loss
        is then also logged as SPLIT_loss{suffix}. None here."""
        return {}

    # ---------------------------------------------------------------- the forward pass

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                return_logits: bool = False, token_weights: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> ModelOutput:
        """Logits (B, T, vocab_size) for token ids idx (B, T), the objective's loss when targets are given (targets
        equal to -1 are ignored; token_weights (B, T), when the objective's batching gives them, weigh each target's
        term), and the layers' auxiliary loss and stats. Train on loss + aux_loss. A diffusion objective reads the
        time (B,) of each row (its batching's extra part): a time-conditioned model embeds it.

        With targets, each head add-on runs too (llm.model.parts.HEADS): `loss` stays the main head's; the add-on's
        auxiliary loss, block stats and figures join aux_loss, layer_stats and stats.

        With targets the logits are returned only when return_logits; otherwise the objective computes the loss
        without materialising them (in chunks of tokens) and `logits` is None.

        With a cache (generation), idx continues the cached tokens and the cache is extended by them.
        """
        x, aux_loss, layer_stats, stats = self.trunk(idx, cache, time)
        logits, loss = self.objective(self.ln_f(x), self.head_weight(), targets, return_logits, token_weights, idx,
                                      time)
        if targets is not None:
            for name in self.head_addons:
                extra = getattr(self, name)(self, x, idx, targets, token_weights)
                aux_loss, layer_stats = aux_loss + extra.aux_loss, layer_stats + extra.layer_stats
                stats = {**stats, **extra.stats}
        return ModelOutput(logits, loss, aux_loss, layer_stats, stats)

    def trunk(self, idx: torch.Tensor, cache: Cache | None = None, time: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The last hidden state (B, T, C) before the final norm for token ids idx (B, T), the layers' summed
        auxiliary loss () and their stats, and model-wide figures (from the architecture's run_blocks); with a cache
        and the diffusion time as in `forward`."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size and not self.streams:
            raise ValueError(f"sequence length {start + T} exceeds block_size={self.config.block_size}")
        positions = torch.arange(T, device=idx.device)[None] if cache is None else cache.positions(T)  # (B or 1, T)
        mask = None if cache is None else cache.mask(T)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)  # (B, T, C)
        if self.time_emb is not None:
            if time is None:
                raise ValueError(f"objective={self.config.objective} embeds the diffusion time: pass time (B,)")
            x = x + self.time_emb(time)[:, None]  # (B, T, C)
        x = self.drop(x)
        values = None if self.value_embeds is None else self.value_embeds(idx, len(self.blocks))  # per layer

        def run_block(i: int, x: torch.Tensor, layer_cache) -> tuple[torch.Tensor, torch.Tensor, dict]:
            return self.call_block(i, x, positions, mask, layer_cache, None if values is None else values[i])

        x, aux_loss, layer_stats, model_stats = self.run_blocks(run_block, x, cache)  # (B, T, C)
        if cache is not None:
            cache.length += T
        return x, aux_loss, layer_stats, model_stats  # (B, T, C), (), per layer, model-wide figures

    def call_block(self, i: int, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                   cache=None, value_embed: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Block i over x (B, T, C) at positions (B or 1, T), with the layer's value embedding (B, T, width) when it
        has one, recomputed in the backward pass when act_recomp is set in training (only this first call's outputs
        are kept, so stats such as MoE loads are counted once)."""
        inputs = (x, positions, mask, cache) + (() if value_embed is None else (value_embed,))
        if self.act_recomp and self.training:
            return checkpoint(self.blocks[i], *inputs, use_reentrant=False)
        return self.blocks[i](*inputs)

    def run_layers(self, layers, x: torch.Tensor, positions: torch.Tensor, caches: list | None,
                   aux_loss: torch.Tensor, layer_stats: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks `layers` (indices) in order over x (N, L, width) at positions (1, L), each with its cache
        when caches are given (generation); their stats fill layer_stats[i]. Returns x and aux_loss plus theirs:
        for architectures whose stacks run at their own widths and lengths (MegaByte, H-Net)."""
        for j, i in enumerate(layers):
            x, aux, stats = self.call_block(i, x, positions, None, None if caches is None else caches[j])
            aux_loss, layer_stats[i] = aux_loss + aux, stats
        return x, aux_loss

    # ---------------------------------------------------------------- generation, accounting, the run

    def stat_blocks(self) -> list[nn.Module]:
        """The blocks whose stats ModelOutput.layer_stats lists: the layers, then each head add-on's blocks."""
        return [*self.blocks, *(block for name in self.head_addons for block in getattr(self, name).blocks())]

    def placeholder_extras(self, batch: int) -> dict[str, torch.Tensor]:
        """The keyword inputs a training forward pass needs beside tokens and targets (a diffusion objective's time
        per row), at placeholder values: for passes that measure rather than train (estimates, benchmarks)."""
        if not OBJECTIVES[self.config.objective].diffusion:
            return {}
        return {"time": torch.full((batch,), 0.5, device=self.tok_emb.weight.device)}

    def generation_refusal(self) -> str | None:
        """Why the model does not generate text (its objective's ObjectiveKind.generation_refusal), or None."""
        return OBJECTIVES[self.config.objective].generation_refusal

    def new_cache(self, batch: int, pad: torch.Tensor | None = None, max_len: int | None = None) -> Cache:
        """An empty cache for `batch` rows, each left-padded by pad[b] tokens (none by default), holding up to
        max_len (default block_size) positions in the dtype of the parameters."""
        if self.generation_refusal() is not None:
            raise ConfigError(self.generation_refusal())
        device, dtype = self.tok_emb.weight.device, self.tok_emb.weight.dtype
        pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        layers = [b.new_cache(batch, max_len or self.config.block_size, dtype, device) for b in self.cache_blocks()]
        return Cache(layers, 0, pad, bool(pad.any()))

    def cache_bytes_per_token(self) -> int:
        """Bytes each token adds to the generation cache, summed over the layers (a sliding-window layer stops
        adding once it holds its window: see cache_bytes)."""
        return sum(layer.nbytes_per_token() for layer in self.new_cache(1, max_len=1).layers)

    def cache_bytes(self, tokens: int) -> int:
        """Bytes the generation cache holds per row after `tokens` tokens, summed over the layers; a sliding-window
        layer counts at most its window of tokens."""
        return sum(layer.nbytes_held(tokens) for layer in self.new_cache(1, max_len=1).layers)

    def configure_run(self, train: Trainconfig) -> None:
        """Gives every feed-forward layer the run's settings (FeedForward.configure_run), and the token objectives'
        loss its own (--fp8_head)."""
        for module in self.modules():
            if isinstance(module, FeedForward):
                module.configure_run(train)
        if isinstance(self.objective, TokenLoss):
            self.objective.configure_run(train)

    def get_num_params(self) -> tuple[int, int]:
        """(total, active) parameter counts; tied weights count once, padded vocabulary rows included.

        Active parameters are those a token uses in training: all but those its feed-forward layers leave out (MoE: the
        routed experts it does not pick). Head add-ons count in both: they run on every training token (MFU counts
        training FLOPs), though generation leaves them out.
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(m.inactive_params() for m in self.modules() if isinstance(m, FeedForward))
        return total, total - inactive

    def skipped_params(self) -> float:
        """Active parameters that the average training token skips: each routed layer's block parameters times the
        fraction of a block_size sequence it leaves out (0 without such layers)."""
        return sum(block.skipped_params(self.config.block_size) for block in self.blocks)
