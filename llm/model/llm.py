"""The language model: embeddings, a stack of per-layer blocks, final norm and output head."""
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, LLMconfig
from .block import Block
from .cache import Cache
from .ffn.experts import ExpertLinear
from .mixers.attention import SlidingWindow
from .mod import RoutedBlock, routes
from .mtp import MultiTokenPrediction
from .ngpt import LogitScale, NormalizedBlock, normalize_after_load, normalize_weights
from .norms import build_norm
from .positions import POSITIONS
from .recurrent import RecurrentDepth, effective_depth, sample_recurrence
from .registry import OBJECTIVES

VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of 64 for faster matmuls


def padded_vocab_size(vocab_size: int) -> int:
    """vocab_size rounded up to a multiple of 64."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class ModelOutput(NamedTuple):
    """What the model returns: logits, the objective's loss, and the feed-forward layers' auxiliary figures."""

    logits: torch.Tensor | None  # (B, T, vocab_size) without targets or when asked for, else None
    loss: torch.Tensor | None  # () the objective's loss (mean cross-entropy) when targets are given
    aux_loss: torch.Tensor  # () sum of the layers' weighted auxiliary losses (0 when no layer has one)
    layer_stats: list[dict[str, torch.Tensor]]  # per layer (then per MTP block), its feed-forward stats (MoE: {"load":
    # (E,)}; dense: {}), with a mixture-of-depths layer's counts added (mod_predicted, mod_agreed, mod_tokens)
    stats: dict[str, torch.Tensor] = {}  # model-wide figures () averaged over micro-steps and ranks, logged by name


class LLM(nn.Module):
    """A decoder-only language model built from an `LLMconfig` and its list of per-layer specs."""

    def __init__(self, config: LLMconfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("LLMconfig.vocab_size is unset; set it or take it from the dataset's meta.json")
        self.config = config
        self.act_recomp = False  # recompute each block's activations in backward (set by the trainer)
        vocab = padded_vocab_size(config.vocab_size)
        self.tok_emb = nn.Embedding(vocab, config.n_embd)
        self.pos_emb = POSITIONS[config.pos_emb](config) if config.pos_emb in POSITIONS else None
        self.drop = nn.Dropout(config.dropout)
        self.ngpt = config.arch == "ngpt"  # the normalized transformer: no norm layers, scaled logits
        self.blocks = nn.ModuleList((NormalizedBlock if self.ngpt else RoutedBlock if routes(config, i) else Block)(
            block, config) for i, block in enumerate(config.layers))
        self.ln_f = nn.Identity() if self.ngpt else build_norm(config)
        self.logit_scale = LogitScale(vocab, config) if self.ngpt else None
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.objective = OBJECTIVES[config.objective].build(config)
        self.causal = OBJECTIVES[config.objective].causal
        for block in self.blocks:
            block.attn.causal = self.causal
        # Runs past block_size: every layer attends within a sliding window (its cache a ring of that window), and
        # RoPE positions have no table to run out of.
        self.streams = self.causal and config.pos_emb == "rope" and all(
            isinstance(getattr(b.attn, "window", None), SlidingWindow) and b.attn.window.size is not None
            for b in self.blocks)
        self.recurrence = RecurrentDepth(config) if config.recurrent_depth else None  # prelude, core x r, coda
        self.mtp = MultiTokenPrediction(config) if config.mtp != "none" else None  # causal: mtp needs clm
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * effective_depth(config))  # GPT-2: scale residual projections by depth
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)
        if self.ngpt:  # weights start on the unit sphere and return to it after every load
            normalize_weights(self)
            self.register_load_state_dict_post_hook(normalize_after_load)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, ExpertLinear)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # the token embedding (tied: the head too) with its own std
            std = self.config.emb_init_std if module is self.tok_emb else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                return_logits: bool = False) -> ModelOutput:
        """Logits (B, T, vocab_size) for token ids idx (B, T), the objective's loss when targets are given (targets
        equal to -1 are ignored), and the layers' auxiliary loss and stats. Train on loss + aux_loss.

        With targets and --mtp, the multi-token prediction modules run too: `loss` stays the main head's, aux_loss
        adds mtp_lambda * the mean of their depths' losses, and stats holds each depth's loss as mtp/loss_K.

        With targets the logits are returned only when return_logits; otherwise the objective computes the loss
        without materialising them (in chunks of tokens) and `logits` is None.

        With a cache (generation), idx continues the cached tokens and the cache is extended by them.
        """
        x, aux_loss, layer_stats, stats = self.trunk(idx, cache)
        logits, loss = self.objective(self.ln_f(x), self.head_weight(), targets, return_logits)
        if self.mtp is not None and targets is not None:
            losses, mtp_aux, mtp_stats = self.mtp(x, idx, targets, self.tok_emb, self.lm_head, self.objective,
                                                  recompute=self.act_recomp and self.training)
            aux_loss = aux_loss + mtp_aux + self.config.mtp_lambda * torch.stack(losses).mean()
            layer_stats = layer_stats + mtp_stats
            stats = {**stats, **{f"mtp/loss_{k}": depth.detach() for k, depth in enumerate(losses, start=1)}}
        return ModelOutput(logits, loss, aux_loss, layer_stats, stats)

    def trunk(self, idx: torch.Tensor, cache: Cache | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The last hidden state (B, T, C) before the final norm for token ids idx (B, T), the layers' summed
        auxiliary loss () and their stats, and model-wide figures (recurrent depth: the recurrence); with a cache as
        in `forward`."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size and not self.streams:
            raise ValueError(f"sequence length {start + T} exceeds block_size={self.config.block_size}")
        positions = torch.arange(T, device=idx.device)[None] if cache is None else cache.positions(T)  # (B or 1, T)
        mask = None if cache is None else cache.mask(T)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)  # (B, T, C)
        x = self.drop(x)

        def run_block(i: int, x: torch.Tensor, layer_cache) -> tuple[torch.Tensor, torch.Tensor, dict]:
            if self.act_recomp and self.training:
                # Recomputation re-runs the block in backward but only this first call's outputs are kept, so stats
                # such as MoE loads are counted once.
                return checkpoint(self.blocks[i], x, positions, mask, layer_cache, use_reentrant=False)
            return self.blocks[i](x, positions, mask, layer_cache)

        model_stats = {}
        if self.recurrence is not None:
            x, aux_loss, layer_stats, model_stats = self.recurrence(run_block, x, cache)  # (B, T, C)
        else:
            aux_loss, layer_stats = torch.zeros((), device=idx.device), []
            for i in range(len(self.blocks)):
                x, aux, stats = run_block(i, x, None if cache is None else cache.layers[i])
                aux_loss = aux_loss + aux
                layer_stats.append(stats)
        if cache is not None:
            cache.length += T
        return x, aux_loss, layer_stats, model_stats  # (B, T, C), (), per layer, model-wide figures

    def head_weight(self) -> torch.Tensor:
        """The output head's weight (V_padded, C); nGPT: each row times its logit scale s_z."""
        return self.lm_head.weight if self.logit_scale is None else self.logit_scale(self.lm_head.weight)

    def mtp_blocks(self) -> list[Block]:
        """The blocks of the multi-token prediction modules (none without --mtp)."""
        return [] if self.mtp is None else [module.block for module in self.mtp.depths]

    def new_cache(self, batch: int, pad: torch.Tensor | None = None, max_len: int | None = None) -> Cache:
        """An empty cache for `batch` rows, each left-padded by pad[b] tokens (none by default), holding up to
        max_len (default block_size) positions in the dtype of the parameters."""
        if not self.causal:
            raise ConfigError(f"objective={self.config.objective!r} is bidirectional (a masked LM): it has no "
                              "generation cache and does not generate text; evaluate it with python -m llm.eval")
        device, dtype = self.tok_emb.weight.device, self.tok_emb.weight.dtype
        pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        blocks = self.blocks if self.recurrence is None else self.recurrence.cached_blocks(self.blocks)
        layers = [b.new_cache(batch, max_len or self.config.block_size, dtype, device) for b in blocks]
        return Cache(layers, 0, pad, bool(pad.any()))

    def cache_bytes_per_token(self) -> int:
        """Bytes each token adds to the generation cache, summed over the layers (a sliding-window layer stops
        adding once it holds its window: see cache_bytes)."""
        return sum(layer.nbytes_per_token() for layer in self.new_cache(1, max_len=1).layers)

    def cache_bytes(self, tokens: int) -> int:
        """Bytes the generation cache holds per row after `tokens` tokens, summed over the layers; a sliding-window
        layer counts at most its window of tokens."""
        return sum(layer.nbytes_held(tokens) for layer in self.new_cache(1, max_len=1).layers)

    def before_step(self, step: int, seed: int) -> None:
        """Before optimizer step `step` of a run seeded with `seed`: a recurrent-depth model draws the step's r."""
        if self.recurrence is not None:
            self.recurrence.train_recurrence = sample_recurrence(self.config, seed, step)

    def after_step(self, layer_stats: list[dict[str, torch.Tensor]]) -> None:
        """After an optimizer step, with each layer's stats summed over the step: every feed-forward layer's hook
        (MoE: the aux-free selection bias moves from the step's expert loads); nGPT puts its weights back on the
        unit sphere."""
        for block, stats in zip([*self.blocks, *self.mtp_blocks()], layer_stats, strict=True):
            block.ffn.after_step(stats)
        if self.ngpt:
            normalize_weights(self)

    def get_num_params(self) -> tuple[int, int]:
        """(total, active) parameter counts; tied weights count once, padded vocabulary rows included.

        Active parameters are those a token uses in training: all but those its feed-forward layers leave out (MoE: the
        routed experts it does not pick). The multi-token prediction modules count in both: they run on every
        training token (MFU counts training FLOPs), though generation leaves them out.
        """
        total = sum(p.numel() for p in self.parameters())
        blocks = [*self.blocks, *self.mtp_blocks()]
        return total, total - sum(block.ffn.inactive_params() for block in blocks)

    def skipped_params(self) -> float:
        """Active parameters that the average training token skips: each mixture-of-depths layer's block parameters
        times the fraction of a block_size sequence it leaves out (0 without such layers)."""
        return sum(block.skipped_params(self.config.block_size) for block in self.blocks)

    def core_params(self) -> int:
        """Active parameters one core iteration uses (its blocks and the adapter); 0 without recurrent depth."""
        if self.recurrence is None:
            return 0
        core = [self.blocks[i] for i in self.recurrence.core]
        active = sum(p.numel() for block in core for p in block.parameters()) - sum(b.ffn.inactive_params() for b in core)
        return active + sum(p.numel() for p in self.recurrence.parameters())
