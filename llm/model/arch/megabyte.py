"""`arch: megabyte`, MegaByte (Yu et al. 2023, "MEGABYTE: Predicting Million-byte Sequences with Multiscale
Transformers"): bytes are grouped into patches of P; a global model runs over the patches, a local model within each
patch. The layers stay in the model's one list (the global model's n_global_layer first, at width P * D_G over
block_size / P patches; then the local model's, at n_embd over P bytes), each built from its layer spec by the
registries, so a global GQA and a local Mamba are flags.

With h_t = E_G[x_t] (D_G wide) and K = T / P patches:
  global input  g_k = start_G (k = 0), else [h_{(k-1)P}; ...; h_{kP-1}] (the previous patch: one patch of shift);
  global output G_k = global_model(g)_k (P * D_G wide), read as P slices G_{k,p} of D_G;
  local input   l_{k,p} = W_GL G_{k,p} + (start_L if p = 0 else E_L[x_{kP+p-1}]) (n_embd wide);
  the local model runs over the P positions of each patch, and byte kP+p is predicted from its output at (k, p).
So byte t sees the whole patches before its own through the global model, and the bytes before it in its own
patch through the local model: the model is causal over bytes.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, LLMconfig, require
from ..cache import Cache
from ..kinds import ArchKind
from ..llm import LLM, padded_vocab_size
from ..parts import build_block
from ..positions import POSITIONS
from .stacks import refuse_window_schedule, require_next_token_prediction

FIELDS = ("patch_size", "n_global_layer", "global_byte_embd")  # the LLMconfig fields only this kind reads


def layer_config(config: LLMconfig, i: int) -> LLMconfig:
    """The config layer i is built with: the global model's width P * D_G over block_size // P + 1 patches (see
    MegaByteLLM.trunk), or the local model's n_embd over the P bytes of a patch."""
    P = max(config.patch_size, 1)
    if i < config.n_global_layer:
        return dataclasses.replace(config, n_embd=P * config.global_byte_embd, block_size=config.block_size // P + 1)
    return dataclasses.replace(config, block_size=P)


class MegaByteCache(Cache):
    """The generation cache: the global layers' caches over patches, the local layers' over the current patch (made
    anew at each patch), the bytes read so far and the global output for the current patch."""

    def __init__(self, global_layers: list, local_layers: list, batch: int, max_len: int, device: torch.device):
        super().__init__(global_layers + local_layers, 0, torch.zeros(batch, dtype=torch.long, device=device), False)
        self.n_global = len(global_layers)
        self.history = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # (B, max_len) bytes read
        self.global_out: torch.Tensor | None = None  # (B, P, D_G) the current patch's global output

    def truncate(self, length: int) -> None:
        raise ConfigError("arch=megabyte keeps no per-byte global state to roll back: speculative decoding is not "
                          "supported; drop --speculative")


class MegaByteLLM(LLM):
    """MegaByte over bytes (see the module's docstring): `tok_emb` is the local model's byte embedding E_L (tied to
    the head by default), `global_emb` the global one E_G; `lm_head` reads the local model's output."""

    arch = "megabyte"

    def build_blocks(self) -> nn.ModuleList:
        """Each layer at its stage's width and length (`layer_config`)."""
        return nn.ModuleList(build_block(layer_config(self.config, i), i) for i in range(self.config.n_layer))

    def add_modules(self) -> None:
        config = self.config
        P, D, C = config.patch_size, config.global_byte_embd, config.n_embd
        self.global_config, self.local_config = layer_config(config, 0), layer_config(config, config.n_layer)
        self.n_global = config.n_global_layer
        vocab = padded_vocab_size(config.vocab_size)
        self.global_emb = nn.Embedding(vocab, D)  # E_G
        self.global_start = nn.Parameter(torch.zeros(P * D))  # the first patch's global input
        self.global_to_local = nn.Linear(D, C, bias=config.bias)  # W_GL
        self.local_start = nn.Parameter(torch.zeros(C))  # the first byte of each patch reads it for a previous byte
        self.pos_emb = None
        kind = POSITIONS.get(config.pos_emb)
        self.global_pos = None if kind is None else kind(self.global_config)  # over patches
        self.local_pos = None if kind is None else kind(self.local_config)  # over the bytes of a patch
        self.streams = False

    def after_init(self) -> None:
        nn.init.normal_(self.global_start, std=0.02)
        nn.init.normal_(self.local_start, std=0.02)

    # ---------------------------------------------------------------- the forward pass

    def global_inputs(self, patches: torch.Tensor, first: bool) -> torch.Tensor:
        """The global model's inputs (B, K, P * D_G) for patches (B, K, P) of bytes, each patch's input being the
        previous one's embeddings: the first is the start vector when `first`, the rest follow one patch behind."""
        B, K, P = patches.shape
        h = self.global_emb(patches).reshape(B, K, -1)  # (B, K, P * D_G)
        if first:
            h = torch.cat((self.global_start.expand(B, 1, -1), h[:, :-1]), dim=1)  # (B, K, P * D_G)
        return h

    def local_inputs(self, global_out: torch.Tensor, previous: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The local model's inputs (N, L, C) from the global output slices (N, L, D_G) and each position's previous
        byte (N, L); positions where `first` (N, L) is set read the start vector instead."""
        before = torch.where(first[..., None], self.local_start, self.tok_emb(previous))  # (N, L, C)
        return self.global_to_local(global_out) + before  # (N, L, C)

    def trunk(self, idx: torch.Tensor, cache: Cache | None = None, time: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The local model's output (B, T, C) for bytes idx (B, T), the layers' auxiliary loss and stats; with a
        cache, idx continues the cached bytes.

        Output t predicts byte t + 1 (as every model here): it is MegaByte's position t + 1, which reads the bytes
        up to t. The bytes idx fill positions 0..T-1 and the positions 1..T are kept, so the patches cover T + 1
        positions (one patch more when P divides T); the padding after the bytes is read by no kept position."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size={self.config.block_size}")
        aux_loss, layer_stats = idx.new_zeros((), dtype=torch.float32), [{} for _ in self.blocks]
        if cache is not None:
            x, aux_loss = self.decode(idx, cache, aux_loss, layer_stats)
            return x, aux_loss, layer_stats, {}
        P, C = self.config.patch_size, self.config.n_embd
        K = T // P + 1  # patches over positions 0..T
        patches = F.pad(idx, (0, K * P - T)).view(B, K, P)  # (B, K, P)
        g = self.global_inputs(patches, first=True)  # (B, K, P * D_G)
        positions = torch.arange(K, device=idx.device)[None]  # (1, K)
        if self.global_pos is not None:
            g = g + self.global_pos(positions)  # (B, K, P * D_G)
        g, aux_loss = self.run_layers(range(self.n_global), self.drop(g), positions, None, aux_loss, layer_stats)
        previous = torch.roll(patches, 1, dims=-1).view(B * K, P)  # (B * K, P) at p: byte p - 1 of the patch
        first = torch.arange(P, device=idx.device) == 0  # (P,)
        x = self.local_inputs(g.view(B * K, P, -1), previous, first.expand(B * K, P))  # (B * K, P, C)
        positions = torch.arange(P, device=idx.device)[None]  # (1, P)
        if self.local_pos is not None:
            x = x + self.local_pos(positions)  # (B * K, P, C)
        x, aux_loss = self.run_layers(range(self.n_global, len(self.blocks)), self.drop(x), positions, None,
                                      aux_loss, layer_stats)
        return x.view(B, K * P, C)[:, 1:T + 1], aux_loss, layer_stats, {}  # (B, T, C)

    def decode(self, idx: torch.Tensor, cache: MegaByteCache, aux_loss: torch.Tensor, layer_stats: list
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached forward pass over bytes idx (B, T) after the cache.length read before: MegaByte's positions
        up to cache.length + T (position 0 too on the first call), patch by patch; the global model steps once
        when a patch begins (on the patch before it), the local model continues within the patch. Returns the
        output (B, T, C) of positions cache.length + 1..cache.length + T and the auxiliary loss."""
        P, n, device = self.config.patch_size, cache.length, idx.device
        B, T = idx.shape
        cache.history[:, n:n + T] = idx
        outputs, position = [], 0 if n == 0 else n + 1
        while position <= n + T:
            p, k = position % P, position // P
            end = min(n + T + 1, (k + 1) * P)  # this segment's positions: up to the end of the patch
            if p == 0:  # a new patch: the global model reads the previous one, the local caches start afresh
                before = cache.history[:, (k - 1) * P:k * P].view(B, 1, P) if k else idx.new_zeros(B, 1, P)
                g = self.global_inputs(before, first=k == 0)[:, -1:]  # (B, 1, P * D_G)
                positions = torch.full((1, 1), k, device=device)  # (1, 1)
                if self.global_pos is not None:
                    g = g + self.global_pos(positions)  # (B, 1, P * D_G)
                g, aux_loss = self.run_layers(range(self.n_global), g, positions, cache.layers[:cache.n_global],
                                              aux_loss, layer_stats)
                cache.global_out = g.view(B, P, -1)  # (B, P, D_G)
                dtype = self.tok_emb.weight.dtype
                cache.layers[cache.n_global:] = [self.blocks[i].new_cache(B, P, dtype, device)
                                                 for i in range(self.n_global, len(self.blocks))]
            offsets = torch.arange(p, end - k * P, device=device)  # (L,) positions within the patch
            previous = cache.history[:, (torch.arange(position, end, device=device) - 1).clamp(min=0)]  # (B, L)
            x = self.local_inputs(cache.global_out[:, offsets], previous, (offsets == 0).expand(B, -1))  # (B, L, C)
            if self.local_pos is not None:
                x = x + self.local_pos(offsets[None])  # (B, L, C)
            x, aux_loss = self.run_layers(range(self.n_global, len(self.blocks)), x, offsets[None],
                                          cache.layers[cache.n_global:], aux_loss, layer_stats)
            outputs.append(x)
            position = end
        cache.length += T
        return torch.cat(outputs, dim=1)[:, -T:], aux_loss  # (B, T, C)

    # ---------------------------------------------------------------- generation and accounting

    def new_cache(self, batch: int, pad: torch.Tensor | None = None, max_len: int | None = None) -> Cache:
        """Global caches over max_len / P patches (max_len: default block_size) and the local caches; rows of
        equal length only (a left-padded row would shift its patches)."""
        if pad is not None and bool(pad.any()):
            raise ConfigError("arch=megabyte reads rows of equal length only (padding would shift the patches); "
                              "give prompts of one length, or one prompt at a time")
        device, dtype = self.tok_emb.weight.device, self.tok_emb.weight.dtype
        max_len = max_len or self.config.block_size
        P = self.config.patch_size
        global_layers = [self.blocks[i].new_cache(batch, max_len // P + 1, dtype, device)
                         for i in range(self.n_global)]
        local_layers = [self.blocks[i].new_cache(batch, P, dtype, device)
                        for i in range(self.n_global, len(self.blocks))]
        return MegaByteCache(global_layers, local_layers, batch, max_len, device)

    def cache_bytes_per_token(self) -> int:
        """Bytes each byte adds to the cache on average: the global layers' per patch over P (the local layers
        hold at most one patch)."""
        layers = self.new_cache(1, max_len=1).layers
        return sum(layer.nbytes_per_token() for layer in layers[:self.n_global]) // self.config.patch_size

    def cache_bytes(self, tokens: int) -> int:
        """Bytes the cache holds per row after `tokens` bytes: the global layers' patches and one patch locally."""
        layers, P = self.new_cache(1, max_len=1).layers, self.config.patch_size
        return (sum(layer.nbytes_held(tokens // P + 1) for layer in layers[:self.n_global])
                + sum(layer.nbytes_held(min(tokens, P)) for layer in layers[self.n_global:]))

    def global_params(self) -> int:
        """Parameters the global model uses once per patch: its blocks (its embedding is read once per byte)."""
        blocks = [self.blocks[i] for i in range(self.n_global)]
        inactive = sum(block.ffn.inactive_params() for block in blocks)
        return sum(p.numel() for block in blocks for p in block.parameters()) - inactive

    def flops_per_token(self) -> float:
        """Per byte: the global blocks' 6 * N and token mixing once per patch (divided by P), everything else (the
        local blocks, embeddings, W_GL and the head) once per byte."""
        P, mixing = self.config.patch_size, [block.mixing_flops() for block in self.blocks]
        global_params = self.global_params()
        per_byte = 6 * (self.get_num_params()[1] - global_params) + sum(mixing[self.n_global:])
        return per_byte + (6 * global_params + sum(mixing[:self.n_global])) / P


def validate(m: LLMconfig) -> None:
    """The fields in range; the objective is next-byte prediction."""
    for name in FIELDS:
        value = getattr(m, name)
        require(value >= 1, f"{name}={value} must be >= 1")
    require(m.n_global_layer <= m.n_layer,
            f"n_global_layer={m.n_global_layer} exceeds n_layer={m.n_layer}; the global model's layers come first, the "
            "local model's after them")
    require_next_token_prediction(m)


MEGABYTE = ArchKind("megabyte", MegaByteLLM, validate, validate_run=refuse_window_schedule, fields=FIELDS,
                    export_refusal="arch=megabyte (a global model over patches and a local model within each); no "
                                   "transformers family holds it", layer_config=layer_config)
