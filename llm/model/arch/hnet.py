"""`arch: hnet`, H-Net (Hwang, Wang, Gu 2025, "Dynamic Chunking for End-to-End Hierarchical Sequence Modeling"):
over bytes, each stage runs an encoder, chooses where chunks begin (dynamic chunking), runs its main network over
the chunks only (an inner stage, or the innermost stack), spreads the chunks back over the positions (smoothing),
and runs a decoder. The layers stay in the model's one list (encoders outermost first, the main network, decoders
innermost first), each built from its layer spec at its stage's width, so Mamba outer stages and an attention main
network are layer specs.

Per stage s, with h the encoder's (normed) output over L positions:
  routing      p_t = clamp((1 - cos(W_q h_{t-1}, W_k h_t)) / 2, 0, 1), p_0 = 1; a chunk begins at t when p_t > 0.5
               (W_q, W_k start as the identity);
  chunking     the hidden states where chunks begin, in order (padded after the last one per row);
  smoothing    z_k = P_k zhat_k + (1 - P_k) z_{k-1} over the main network's outputs zhat, P_k = clamp(p, 1e-4,
               1 - 1e-4) at the k-th chunk's first position; position t takes z of the chunk it lies in;
  residual     y_t = z_{c(t)} * STE(q_t) + W_res h_t, q_t = p_t where a chunk begins, else 1 - p_t; STE is 1 in the
               forward pass and passes the gradient to q (W_res starts at zero);
  ratio loss   N/(N-1) ((N-1) F G + (1-F)(1-G)), F the fraction of positions that begin a chunk, G the mean p;
               alpha times its sum over the stages joins the training loss.
Everything at position t reads positions <= t only, so the model is causal over bytes.
"""
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ...config import ConfigError, LLMconfig, require
from ..cache import Cache
from ..kinds import ArchKind
from ..llm import LLM
from ..norms import build_norm
from ..parts import build_block
from .stacks import refuse_window_schedule, require_next_token_prediction

FIELDS = ("hnet_encoder_layers", "hnet_decoder_layers", "hnet_widths", "hnet_ratios", "ratio_loss_weight")
P_MIN, P_MAX = 1e-4, 1 - 1e-4  # the smoothing's clamp of a chunk's boundary probability


def stage_widths(config: LLMconfig) -> list[int]:
    """The width of each stage, outermost first, the main network's last: n_embd, then hnet_widths."""
    return [config.n_embd, *(config.hnet_widths or [config.n_embd] * len(config.hnet_encoder_layers))]


def layer_stages(config: LLMconfig) -> list[int]:
    """The stage of each layer: s for stage s's encoder and decoder, the number of stages for the main network."""
    encoders, decoders = config.hnet_encoder_layers, config.hnet_decoder_layers
    main = config.n_layer - sum(encoders) - sum(decoders)
    stages = [s for s, count in enumerate(encoders) for _ in range(count)] + [len(encoders)] * max(main, 0)
    return stages + [s for s in reversed(range(len(decoders))) for _ in range(decoders[s])]


def layer_config(config: LLMconfig, i: int) -> LLMconfig:
    """The config layer i is built with: its stage's width (the model's until the fields are validated)."""
    stages, widths = layer_stages(config), stage_widths(config)
    width = widths[stages[i]] if i < len(stages) and stages[i] < len(widths) else config.n_embd
    return config if width == config.n_embd else dataclasses.replace(config, n_embd=width)


class StraightThrough(torch.autograd.Function):
    """1 in the forward pass; the gradient passes to the input unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class Routing(nn.Module):
    """The boundary probability of each position from the cosine of its projected state with the previous one's."""

    def __init__(self, width: int):
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)

    def start_at_identity(self) -> None:
        nn.init.eye_(self.q.weight)
        nn.init.eye_(self.k.weight)

    def forward(self, h: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """p (B, L) for states h (B, L, C); `previous` (B, C) is the state before h[:, 0] (None: h begins the
        sequence, so p_0 = 1)."""
        q = F.normalize(self.q(h if previous is None else torch.cat((previous[:, None], h), 1)), dim=-1)
        k = F.normalize(self.k(h), dim=-1)  # (B, L, C)
        if previous is None:
            cos = (q[:, :-1] * k[:, 1:]).sum(-1)  # (B, L - 1)
            return torch.cat((cos.new_ones(h.size(0), 1), ((1 - cos) / 2).clamp(0, 1)), dim=1)  # (B, L)
        return ((1 - (q[:, :-1] * k).sum(-1)) / 2).clamp(0, 1)  # (B, L)


def chunk(h: torch.Tensor, boundary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The states (B, M, C) where chunks begin, in order, padded with zeros after each row's last (M the most
    chunks of a row), which of them are real (B, M), and their positions (B, M)."""
    counts = boundary.sum(1)  # (B,)
    # Fake tensors (the preflight estimate) hold no values: the estimate takes the most chunks, one per position.
    M = h.size(1) if is_fake(counts) else int(counts.max())
    order = torch.argsort((~boundary).to(torch.uint8), dim=1, stable=True)[:, :M]  # (B, M) chunk starts first
    real = torch.arange(M, device=h.device)[None] < counts[:, None]  # (B, M)
    chunks = h.gather(1, order[..., None].expand(-1, -1, h.size(-1))) * real[..., None]  # (B, M, C)
    return chunks, real, order


def smooth(z: torch.Tensor, p: torch.Tensor, boundary: torch.Tensor, start: torch.Tensor | None = None
           ) -> torch.Tensor:
    """The de-chunked states (B, L, C): the EMA zbar_k = P_k z_k + (1 - P_k) zbar_{k-1} over the chunks z (B, M, C)
    with P = clamp(p) (B, M) of each chunk, from zbar_{-1} = start (B, C) (zeros when None), spread over the L
    positions (B, L) of `boundary` (a position takes its chunk's zbar; one before any chunk takes start)."""
    B, M, C = z.shape
    dtype = torch.promote_types(z.dtype, torch.float32)  # at least fp32 (bf16 training)
    P = p.to(dtype).clamp(P_MIN, P_MAX)  # (B, M)
    log_keep = torch.log1p(-P)  # (B, M) log(1 - P)
    rows = torch.arange(M, device=z.device)
    after = rows[:, None] > rows[None, :]  # (M, M) i > j
    spans = log_keep[:, :, None].masked_fill(~after, 0).cumsum(1)  # (B, M, M) [k, j]: sum of log(1 - P_i), j < i <= k
    weights = spans.masked_fill(rows[:, None] < rows[None, :], float("-inf")).exp() * P[:, None, :]  # (B, M, M)
    zbar = weights @ z.to(dtype)  # (B, M, C)
    if start is not None:
        zbar = zbar + log_keep.cumsum(1).exp()[..., None] * start.to(dtype)[:, None]  # (B, M, C)
    held = z.new_zeros(B, 1, C) if start is None else start[:, None].to(z.dtype)  # (B, 1, C)
    zbar = torch.cat((held, zbar.to(z.dtype)), dim=1)  # (B, 1 + M, C)
    index = boundary.long().cumsum(1)  # (B, L) 0: before the first chunk
    return zbar.gather(1, index[..., None].expand(-1, -1, C))  # (B, L, C)


def ratio_loss(boundary: torch.Tensor, p: torch.Tensor, real: torch.Tensor | None, N: float) -> torch.Tensor:
    """N/(N-1) ((N-1) F G + (1-F)(1-G)) over the real positions (B, L) (all when None): F the fraction that begin a
    chunk, G the mean boundary probability; 1 at F = G = 1/N."""
    weight = torch.ones_like(p) if real is None else real.to(p.dtype)  # (B, L)
    total = weight.sum()
    f = (boundary.to(p.dtype) * weight).sum() / total
    g = (p * weight).sum() / total
    return N / (N - 1) * ((N - 1) * f * g + (1 - f) * (1 - g))


@dataclass
class Figures:
    """What a forward pass gathers besides the hidden states: the auxiliary loss, each layer's stats and the
    model-wide figures."""

    aux_loss: torch.Tensor
    layer_stats: list
    stats: dict = field(default_factory=dict)


@dataclass
class StageState:
    """One stage's generation state for its rows: its layers' caches, the routing's last state, the smoothing's
    last value, and each row's inner state (rows form chunks at their own pace, so each advances alone)."""

    encoder: list  # the encoder's layer caches (the innermost stage's: the main network's)
    decoder: list
    length: int = 0
    last_hidden: torch.Tensor | None = None  # (B, C) the encoder's last output
    last_z: torch.Tensor | None = None  # (B, C) the smoothing's last value
    inner: list = field(default_factory=list)  # per row: the next stage's StageState (batch 1), or None


class HNetCache(Cache):
    """The generation cache of an H-Net: the outer stage's state (and, within it, each row's inner states)."""

    def __init__(self, root: StageState, batch: int, device: torch.device):
        super().__init__([], 0, torch.zeros(batch, dtype=torch.long, device=device), False)
        self.root = root

    def truncate(self, length: int) -> None:
        raise ConfigError("arch=hnet cannot roll back its chunk boundaries: speculative decoding is not supported; "
                          "drop --speculative")


class HNetLLM(LLM):
    """H-Net over bytes (see the module's docstring): `tok_emb` embeds the bytes, `lm_head` reads the outer decoder."""

    arch = "hnet"
    compiles_whole = False  # the number of chunks changes with the data: each block compiles on its own

    def build_blocks(self) -> nn.ModuleList:
        """Each layer at its stage's width."""
        return nn.ModuleList(build_block(layer_config(self.config, i), i) for i in range(self.config.n_layer))

    def add_modules(self) -> None:
        config = self.config
        self.n_stages, self.widths = len(config.hnet_encoder_layers), stage_widths(config)
        stages = layer_stages(config)
        n_encoder = sum(config.hnet_encoder_layers)
        self.encoders = [[i for i in range(n_encoder) if stages[i] == s] for s in range(self.n_stages)]
        self.decoders = [[i for i in range(n_encoder, config.n_layer) if stages[i] == s] for s in range(self.n_stages)]
        self.main = [i for i, stage in enumerate(stages) if stage == self.n_stages]

        def norm(width: int) -> nn.Module:
            return build_norm(dataclasses.replace(config, n_embd=width))

        self.encoder_norms = nn.ModuleList(norm(w) for w in self.widths[:-1])
        self.decoder_norms = nn.ModuleList(norm(w) for w in self.widths[1:-1])  # stage s >= 1 (s = 0: ln_f)
        self.main_norm = norm(self.widths[-1])
        self.routings = nn.ModuleList(Routing(w) for w in self.widths[:-1])
        self.residuals = nn.ModuleList(nn.Linear(w, w, bias=False) for w in self.widths[:-1])
        self.widenings = nn.ParameterDict({str(s): nn.Parameter(torch.zeros(inner - outer))  # stages that widen
                                           for s, (outer, inner) in enumerate(zip(self.widths, self.widths[1:]))
                                           if inner > outer})
        self.streams = False

    def after_init(self) -> None:
        for routing, residual in zip(self.routings, self.residuals):
            routing.start_at_identity()
            nn.init.zeros_(residual.weight)

    # ---------------------------------------------------------------- the forward pass

    def run_stack(self, layers: list[int], x: torch.Tensor, positions: torch.Tensor, caches: list | None,
                  figures: Figures) -> torch.Tensor:
        """The layers over x (B, L, C) at positions (1, L) (LLM.run_layers), their figures gathered."""
        x, figures.aux_loss = self.run_layers(layers, x, positions, caches, figures.aux_loss, figures.layer_stats)
        return x

    def widen(self, s: int, chunks: torch.Tensor) -> torch.Tensor:
        """Stage s's chunks (B, M, C_s) widened to the next stage's width by its learned vector."""
        if str(s) not in self.widenings:
            return chunks
        extra = self.widenings[str(s)]  # (C_s+1 - C_s,)
        return torch.cat((chunks, extra.to(chunks.dtype).expand(*chunks.shape[:-1], -1)), dim=-1)  # (B, M, C_s+1)

    def stage(self, s: int, x: torch.Tensor, real: torch.Tensor | None, figures: Figures) -> torch.Tensor:
        """Stage s over x (B, L, C_s), whose positions `real` (B, L) are real (None: all; padding follows them);
        the innermost stage is the main network."""
        positions = torch.arange(x.size(1), device=x.device)[None]  # (1, L)
        if s == self.n_stages:
            return self.main_norm(self.run_stack(self.main, x, positions, None, figures))
        h = self.encoder_norms[s](self.run_stack(self.encoders[s], x, positions, None, figures))  # (B, L, C_s)
        p = self.routings[s](h)  # (B, L)
        boundary = p > 0.5 if real is None else (p > 0.5) & real  # (B, L)
        figures.aux_loss = figures.aux_loss + self.config.ratio_loss_weight * ratio_loss(
            boundary, p, real, self.config.hnet_ratios[s])
        chunks, chunk_real, order = chunk(h, boundary)  # (B, M, C_s), (B, M), (B, M)
        positions_real = x.size(0) * x.size(1) if real is None else real.sum()
        figures.stats[f"hnet/compression{s}"] = (positions_real / chunk_real.sum()).detach().float()
        z = self.stage(s + 1, self.widen(s, chunks), chunk_real, figures)[..., :h.size(-1)]  # (B, M, C_s)
        zbar = smooth(z, p.gather(1, order), boundary)  # (B, L, C_s)
        chosen = torch.where(boundary, p, 1 - p)  # (B, L)
        y = zbar * StraightThrough.apply(chosen)[..., None] + self.residuals[s](h)  # (B, L, C_s)
        y = self.run_stack(self.decoders[s], y, positions, None, figures)
        return y if s == 0 else self.decoder_norms[s - 1](y)

    def stage_step(self, s: int, x: torch.Tensor, state, figures: Figures) -> torch.Tensor:
        """Stage s over x (B, L, C_s) continuing its state (generation): the same values as `stage` on the whole
        sequence. A row's new chunks run through its own inner state."""
        positions = torch.arange(state.length, state.length + x.size(1), device=x.device)[None]  # (1, L)
        if s == self.n_stages:
            out = self.main_norm(self.run_stack(self.main, x, positions, state.encoder, figures))
            state.length += x.size(1)
            return out
        h = self.encoder_norms[s](self.run_stack(self.encoders[s], x, positions, state.encoder, figures))
        p = self.routings[s](h, state.last_hidden)  # (B, L)
        boundary = p > 0.5  # (B, L)
        rows = []
        for r in range(x.size(0)):
            picked = boundary[r].nonzero().squeeze(1)  # (n,)
            start = None if state.last_z is None else state.last_z[r:r + 1]  # (1, C_s)
            if picked.numel() == 0:
                rows.append(h.new_zeros(1, x.size(1), h.size(-1)) if start is None else start[:, None].expand(
                    1, x.size(1), -1))
                continue
            if state.inner[r] is None:
                state.inner[r] = self.new_state(s + 1, 1)
            z = self.stage_step(s + 1, self.widen(s, h[r:r + 1, picked]), state.inner[r], figures)  # (1, n, C_s+1)
            rows.append(smooth(z[..., :h.size(-1)], p[r:r + 1, picked], boundary[r:r + 1], start))  # (1, L, C_s)
        zbar = torch.cat(rows)  # (B, L, C_s)
        state.last_hidden, state.last_z = h[:, -1], zbar[:, -1]
        y = zbar + self.residuals[s](h)  # (B, L, C_s): the straight-through factor is 1
        y = self.run_stack(self.decoders[s], y, positions, state.decoder, figures)
        state.length += x.size(1)
        return y if s == 0 else self.decoder_norms[s - 1](y)

    def trunk(self, idx: torch.Tensor, cache: Cache | None = None, time: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The outer decoder's output (B, T, C) for bytes idx (B, T), the auxiliary loss (the layers' and the
        weighted ratio losses), the layers' stats and each stage's compression (hnet/compressionS: positions per
        chunk); with a cache, idx continues the cached bytes."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size={self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device)[None])  # (B, T, C)
        figures = Figures(x.new_zeros((), dtype=torch.float32), [{} for _ in self.blocks])
        if cache is None:
            x = self.stage(0, self.drop(x), None, figures)
        else:
            x = self.stage_step(0, x, cache.root, figures)
            cache.length += T
        return x, figures.aux_loss, figures.layer_stats, figures.stats  # (B, T, C)

    # ---------------------------------------------------------------- generation and accounting

    def new_state(self, s: int, batch: int) -> StageState:
        """Stage s's empty generation state for `batch` rows (the main network's: its layers' caches)."""
        device, dtype, max_len = self.tok_emb.weight.device, self.tok_emb.weight.dtype, self.config.block_size

        def caches(layers: list[int]) -> list:
            return [self.blocks[i].new_cache(batch, max_len, dtype, device) for i in layers]

        if s == self.n_stages:
            return StageState(caches(self.main), [])
        return StageState(caches(self.encoders[s]), caches(self.decoders[s]), inner=[None] * batch)

    def new_cache(self, batch: int, pad: torch.Tensor | None = None, max_len: int | None = None) -> Cache:
        """The outer stage's state for `batch` rows of equal length (left padding would be read as bytes)."""
        if pad is not None and bool(pad.any()):
            raise ConfigError("arch=hnet reads rows of equal length only (padding would be chunked as bytes); give "
                              "prompts of one length, or one prompt at a time")
        return HNetCache(self.new_state(0, batch), batch, self.tok_emb.weight.device)

    def reach(self) -> list[float]:
        """The fraction of the bytes that reach each stage at the target ratios (1 outside, 1/N_0 inside it, ...)."""
        fractions = [1.0]
        for N in self.config.hnet_ratios:
            fractions.append(fractions[-1] / N)
        return fractions

    def layer_reach(self) -> list[float]:
        """The fraction of the bytes each layer reads, at the target ratios."""
        reach = self.reach()
        return [reach[stage] for stage in layer_stages(self.config)]

    def cache_bytes_per_token(self) -> int:
        """Bytes each byte adds to the caches at the target ratios (an inner layer's per chunk, over N)."""
        caches = [block.new_cache(1, 1, self.tok_emb.weight.dtype, self.tok_emb.weight.device)
                  for block in self.blocks]
        return round(sum(c.nbytes_per_token() * f for c, f in zip(caches, self.layer_reach())))

    def cache_bytes(self, tokens: int) -> int:
        """Bytes the caches hold per row after `tokens` bytes, at the target ratios."""
        caches = [block.new_cache(1, 1, self.tok_emb.weight.dtype, self.tok_emb.weight.device)
                  for block in self.blocks]
        return sum(c.nbytes_held(max(1, round(tokens * f))) for c, f in zip(caches, self.layer_reach()))

    def flops_per_token(self) -> float:
        """Per byte at the target ratios: each layer's 6 * N and token mixing times the fraction of the bytes that
        reach its stage; the embeddings, routing, residual projections and head once per byte."""
        layers = [sum(p.numel() for p in block.parameters()) - block.ffn.inactive_params() for block in self.blocks]
        once = 6 * (self.get_num_params()[1] - sum(layers))
        return once + sum(f * (6 * n + block.mixing_flops())
                          for f, n, block in zip(self.layer_reach(), layers, self.blocks))


def validate(m: LLMconfig) -> None:
    """The stages' lists agree, the main network keeps at least one layer, the ratios and widths are in range, and
    the objective is next-byte prediction."""
    S = len(m.hnet_encoder_layers)
    require(S >= 1, "hnet_encoder_layers is empty; give one entry per stage (e.g. --hnet_encoder_layers 4)")
    for name in ("hnet_decoder_layers", "hnet_ratios"):
        require(len(getattr(m, name)) == S, f"{name}={getattr(m, name)} needs one entry per stage, as "
                                            f"hnet_encoder_layers={m.hnet_encoder_layers} ({S})")
    require(not m.hnet_widths or len(m.hnet_widths) == S,
            f"hnet_widths={m.hnet_widths} needs one entry per stage ({S}), or none (n_embd throughout)")
    for name in ("hnet_encoder_layers", "hnet_decoder_layers"):
        require(min(getattr(m, name)) >= 0, f"{name}={getattr(m, name)} must be >= 0 each")
    main = m.n_layer - sum(m.hnet_encoder_layers) - sum(m.hnet_decoder_layers)
    require(main >= 1, f"arch=hnet: n_layer={m.n_layer} leaves {main} layers for the main network after the encoders "
                       f"{m.hnet_encoder_layers} and decoders {m.hnet_decoder_layers}; raise n_layer")
    require(min(m.hnet_ratios) > 1, f"hnet_ratios={m.hnet_ratios} must be > 1 each (a target downsampling factor)")
    widths = stage_widths(m)
    require(all(a <= b for a, b in zip(widths, widths[1:])),
            f"hnet_widths={m.hnet_widths} must not narrow inward from n_embd={m.n_embd} (a chunk is widened)")
    require(m.ratio_loss_weight >= 0, f"ratio_loss_weight={m.ratio_loss_weight} must be >= 0")
    require_next_token_prediction(m)


HNET = ArchKind("hnet", HNetLLM, validate, validate_run=refuse_window_schedule, fields=FIELDS,
                export_refusal="arch=hnet (dynamic chunking between stages); no transformers family holds it",
                layer_config=layer_config)
