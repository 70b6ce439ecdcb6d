"""Hyena (`attn: hyena`), after Poli et al., "Hyena Hierarchy: Towards Larger Convolutional Language Models" (2023,
arXiv:2302.10866), in the form of the safari / HyenaDNA `HyenaOperator`.

A layer of order N projects each token to N + 1 streams of width C (gates x_0 .. x_{N-1} and a value v), runs a
short depthwise convolution along the sequence over them, and then alternates gating and long convolutions:

    z = v;  for each step o = 0 .. N-2:  u = z * x_{N-1-o},  z = (h_o * u) + D_o u;   y = c_proj(z * x_0)

where h_o * u is a causal convolution, (h_o * u)_t = sum_{s <= t} h_o[t - s] u_s, with a filter as long as the
sequence, computed by FFT in O(T log T), and D_o a learned per-channel skip. The long filters are implicit: a small
MLP with Sin activations maps positional features of each lag to the N - 1 filters of C channels, times an
exponential decay window per channel. A filter's value at a lag depends on that lag alone (its features are
normalised by block_size, not by T), so a prefix's outputs never depend on later tokens.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BlockConfig, LLMconfig, require
from ..cache import TokenCache
from ..kinds import MixerKind

DECAY_TARGET = 1e-2  # the decay window of the fastest (slowest) channel reaches this at hyena_fast (slow)_decay
HIDDEN_LAYERS = 3  # Linear + Sin layers of the filter MLP before its output layer (safari: emb -> F, then 2 F -> F)


class HyenaCache(TokenCache):
    """Per token, its projections ((N+1)·C: the short convolution of later tokens reads them) and its inputs to the
    N - 1 long convolutions ((N-1, C)), (B, max_len, ...) each, and the long filters for max_len lags, computed at
    the first call (the weights do not change while generating)."""

    def __init__(self, batch: int, max_len: int, order: int, width: int, dtype: torch.dtype, device: torch.device):
        super().__init__(batch, max_len, [((order + 1) * width,), (order - 1, width)], dtype, device)
        self.max_len = max_len
        self.filters: torch.Tensor | None = None  # (max_len, N - 1, C) fp32

    def projections(self, new: torch.Tensor) -> torch.Tensor:
        """Stores the new tokens' projections (B, T, (N+1)·C) and returns every token's so far (B, S, (N+1)·C)."""
        end = self.length + new.size(1)
        self.tensors[0][:, self.length:end] = new
        return self.tensors[0][:, :end]

    def conv_inputs(self, step: int, new: torch.Tensor) -> torch.Tensor:
        """Stores the new tokens' inputs (B, T, C) to long convolution `step`; returns all tokens' so far (B, S, C)."""
        end = self.length + new.size(1)
        self.tensors[1][:, self.length:end, step] = new
        return self.tensors[1][:, :end, step]

    def advance(self, tokens: int) -> None:
        """Marks the stored tokens as cached, once every step has stored them."""
        self.length += tokens


def positional_features(length: int, block_size: int, emb_dim: int, device: torch.device,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The filter MLP's inputs for lags 0 .. length-1, (length, emb_dim) in dtype: t = lag / (block_size - 1) in [0, 1],
    then cos and -sin of 2π f lag / block_size for (emb_dim - 1) / 2 frequencies f spaced from 1e-4 to bands - 1
    (the real and imaginary parts of exp(-i 2π f lag / block_size), as in safari's PositionalEmbedding)."""
    lag = torch.arange(length, device=device, dtype=dtype)  # (L,)
    bands = (emb_dim - 1) // 2
    frequencies = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=dtype)  # (bands,)
    angle = 2 * math.pi * lag[:, None] * frequencies / block_size  # (L, bands)
    t = lag[:, None] / max(block_size - 1, 1)  # (L, 1)
    return torch.cat((t, angle.cos(), -angle.sin()), dim=-1)  # (L, emb_dim)


class ImplicitFilter(nn.Module):
    """The N - 1 long filters of C channels as functions of the lag: an MLP over positional features, Linear(emb_dim,
    F), Sin, then two Linear(F, F), Sin (one learned frequency vector w shared by the three Sin layers), then
    Linear(F, (N-1)·C) without bias; times the decay window exp(-t |delta_c|) + shift, with rates delta_c spaced
    linearly over the (N-1)·C channels so that the windows fall to 1e-2 between t = fast and t = slow."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.block_size, self.emb_dim = config.block_size, block.hyena_emb_dim
        self.order, self.width, hidden = block.hyena_order, config.n_embd, block.hyena_filter_order
        self.hidden = nn.ModuleList(nn.Linear(self.emb_dim if i == 0 else hidden, hidden)
                                    for i in range(HIDDEN_LAYERS))
        self.out = nn.Linear(hidden, (self.order - 1) * self.width, bias=False)
        self.frequency = nn.Parameter(torch.full((hidden,), block.hyena_sin_freq))  # (F,)
        self.fast_decay, self.slow_decay, self.shift = block.hyena_fast_decay, block.hyena_slow_decay, \
            block.hyena_decay_shift

    def forward(self, length: int) -> torch.Tensor:
        """The filters h[lag, step, channel] for lags 0 .. length-1, (length, N - 1, C) in fp32 (fp64 for an fp64
        model); the MLP runs in the parameters' dtype."""
        dtype = torch.promote_types(self.frequency.dtype, torch.float32)
        features = positional_features(length, self.block_size, self.emb_dim, self.frequency.device, dtype)  # (L, E)
        h = features.to(self.frequency.dtype)
        for layer in self.hidden:
            h = torch.sin(self.frequency * layer(h))  # (L, F)
        h = self.out(h).to(dtype)  # (L, (N-1)·C)
        rates = torch.linspace(math.log(DECAY_TARGET) / self.slow_decay, math.log(DECAY_TARGET) / self.fast_decay,
                               h.size(-1), device=h.device, dtype=h.dtype).abs()  # ((N-1)·C,)
        window = torch.exp(-features[:, :1] * rates) + self.shift  # (L, (N-1)·C)
        return (h * window).view(length, self.order - 1, self.width)  # (L, N - 1, C)


def fft_conv(u: torch.Tensor, h: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """sum_s h[|t - s|] u_s over s <= t (causal) or over every s (two-sided, the filter mirrored), for u (B, T, C)
    and a filter h (T, C), by FFTs of size 2T (no wrap-around) in fp32 (fp64 for fp64 inputs); returns (B, T, C) in
    u's dtype."""
    T = u.size(1)
    dtype = torch.promote_types(torch.promote_types(u.dtype, h.dtype), torch.float32)
    kernel = h if causal else torch.cat((h, torch.zeros_like(h[:1]), h[1:].flip(0)))  # (T or 2T, C)
    spectrum = torch.fft.rfft(u.to(dtype), n=2 * T, dim=1) * torch.fft.rfft(kernel.to(dtype), n=2 * T, dim=0)
    return torch.fft.irfft(spectrum, n=2 * T, dim=1)[:, :T].to(u.dtype)  # (B, T, C)


class Hyena(nn.Module):
    """The Hyena operator of order N = hyena_order over width C = n_embd (one head, inner width C, as HyenaDNA).

    in_proj Linear(C, (N+1)·C) gives, per token, the streams x_0 .. x_{N-1}, v (in that order); a depthwise Conv1d of
    kernel K = hyena_short_filter mixes each stream over the token and its K - 1 predecessors; the long convolutions
    use the filters of `ImplicitFilter` and the skips D ((N-1)·C); c_proj Linear(C, C) maps the result back.
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.order, self.width, self.kernel = block.hyena_order, config.n_embd, block.hyena_short_filter
        streams = (self.order + 1) * self.width
        self.in_proj = nn.Linear(self.width, streams, bias=config.bias)
        self.short_filter = nn.Conv1d(streams, streams, self.kernel, groups=streams, bias=config.bias)
        self.filter = ImplicitFilter(block, config)
        self.skip = nn.Parameter(torch.randn((self.order - 1) * self.width))  # D, ((N-1)·C,)
        self.c_proj = nn.Linear(self.width, self.width, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.causal = True  # set by the model from its objective (False: two-sided filters, a centred short conv)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> HyenaCache:
        return HyenaCache(batch, max_len, self.order, self.width, dtype, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: HyenaCache | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, continues the cached tokens (each new token's long convolutions
        run directly over the cached inputs). A mask comes only with a cache, for left-padded rows: their padding
        tokens are zeroed in the projections and in the long convolutions' inputs, so no real token reads them and
        each row's real tokens are convolved as the row alone would be."""
        B, T, C = x.shape
        N = self.order
        proj = self.in_proj(x)  # (B, T, (N+1)·C)
        real = None if mask is None else self.real_tokens(positions, cache.length, T).to(proj.dtype)  # (B, T, 1)
        if real is not None:
            proj = proj * real
        history = proj if cache is None else cache.projections(proj)  # (B, S, (N+1)·C)
        streams = self.short_conv(history, T).view(B, T, N + 1, C)  # (B, T, N+1, C)
        gates, z = streams[:, :, :N], streams[:, :, N]  # (B, T, N, C), (B, T, C)
        filters = self.filter(T) if cache is None else self.cached_filters(cache)  # (L, N-1, C)
        skip = self.skip.view(N - 1, C)  # (N-1, C)
        for step in range(N - 1):
            u = z * gates[:, :, N - 1 - step]  # (B, T, C)
            if real is not None:
                u = u * real
            z = self.long_conv(u, filters[:, step], cache, step) + skip[step] * u  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self.resid_dropout(self.c_proj(z * gates[:, :, 0]))  # (B, T, C)

    def short_conv(self, history: torch.Tensor, T: int) -> torch.Tensor:
        """The depthwise convolution's outputs (B, T, W) for the last T of the projections (B, S, W): over each
        token and its K - 1 predecessors (zeros before the first), or centred when not causal."""
        K = self.kernel
        if self.causal:
            window = F.pad(history, (0, 0, K - 1, 0))[:, -(T + K - 1):]  # (B, T + K - 1, W)
        else:
            window = F.pad(history, (0, 0, (K - 1) // 2, K // 2))  # (B, T + K - 1, W)
        return self.short_filter(window.transpose(1, 2)).transpose(1, 2)  # (B, T, W)

    def long_conv(self, u: torch.Tensor, h: torch.Tensor, cache: HyenaCache | None, step: int) -> torch.Tensor:
        """(h * u) for the new tokens' inputs u (B, T, C) with the filter h (L, C): by FFT over the sequence, or with a
        cache over every cached input, directly for one new token (O(S·C)) and by FFT for several."""
        T = u.size(1)
        if cache is None:
            return fft_conv(u, h, self.causal)  # (B, T, C)
        history = cache.conv_inputs(step, u)  # (B, S, C)
        S = history.size(1)
        if T == 1:
            return torch.einsum("bsc,sc->bc", history.to(h.dtype), h[:S].flip(0))[:, None].to(u.dtype)  # (B, 1, C)
        return fft_conv(history, h[:S])[:, -T:]  # (B, T, C)

    def cached_filters(self, cache: HyenaCache) -> torch.Tensor:
        """The long filters for every lag the cache can hold, computed once per cache."""
        if cache.filters is None:
            cache.filters = self.filter(cache.max_len)  # (max_len, N-1, C)
        return cache.filters

    @staticmethod
    def real_tokens(positions: torch.Tensor, cached: int, T: int) -> torch.Tensor:
        """(B, T, 1) True for the new tokens that are real, False for left padding. A row's padding is read from the
        position of its last token, which is always real: with S = cached + T tokens in all, the row has S - 1 -
        position padding tokens."""
        pad = cached + T - 1 - positions[:, -1:]  # (B, 1)
        index = torch.arange(cached, cached + T, device=positions.device)  # (T,)
        return (index >= pad)[..., None]  # (B, T, 1)


def validate(block: BlockConfig, config: LLMconfig) -> None:
    """The order, widths and kernel are in range, the decay fractions positive, and the layer is not routed."""
    require(block.hyena_order >= 2, f"hyena_order={block.hyena_order} must be >= 2 (two gates and one long "
                                    "convolution at least); raise it")
    require(block.hyena_filter_order >= 1, f"hyena_filter_order={block.hyena_filter_order} must be >= 1")
    require(block.hyena_emb_dim >= 3 and block.hyena_emb_dim % 2 == 1,
            f"hyena_emb_dim={block.hyena_emb_dim} must be odd and >= 3 (the position t plus cosine and sine bands); "
            "use 3, 5, ...")
    require(block.hyena_short_filter >= 1, f"hyena_short_filter={block.hyena_short_filter} must be >= 1")
    for name in ("hyena_fast_decay", "hyena_slow_decay"):
        value = getattr(block, name)
        require(value > 0, f"{name}={value} must be > 0 (a fraction of block_size)")
    require(block.hyena_decay_shift >= 0, f"hyena_decay_shift={block.hyena_decay_shift} must be >= 0")
    require(not block.mod, "mod=true with attn='hyena': its convolutions take no mask over routed tokens; use "
                           "another attn on this layer or drop mod")


def mixing_flops(block: BlockConfig, config: LLMconfig) -> float:
    """The order - 1 long convolutions over n_embd channels, forward and backward: per channel and token, a real
    FFT of the input and an inverse one of 2T points (2.5 n log2 n FLOPs each) and the spectra's complex product
    (6 FLOPs a bin); the filters' FFT is shared by the batch and not counted."""
    T = config.block_size
    per_channel = (2 * 2.5 * 2 * T * math.log2(2 * T) + 6 * (T + 1)) / T
    return 3 * (block.hyena_order - 1) * config.n_embd * per_channel


HYENA = MixerKind("hyena", Hyena, validate, {
    "hyena": dict(attn="hyena", hyena_filter_order=16),
    "hyena_order3": dict(attn="hyena", hyena_order=3, hyena_filter_order=8, hyena_emb_dim=5, hyena_short_filter=4,
                         hyena_sin_freq=10.0, hyena_decay_shift=0.05),
}, mixing_flops=mixing_flops)
