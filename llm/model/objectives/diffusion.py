"""What the discrete diffusion objectives (mdlm, sedd, d3pm) share: the noise schedules, the noising of the rows
(the batching), the time embedding, per-token loss terms computed over chunks of tokens, and the validation
figures of a bound.

A row of clean tokens x0 is noised to x_t at a time t drawn per row; the model reads x_t (and, when time-conditioned,
t) with every mixer bidirectional and the loss module turns its output into the objective's per-token terms. The
loss is the sum of the terms over the scored tokens divided by their number: the negative ELBO per token (d3pm:
plus its hybrid term), a bound on the negative log-likelihood per token in nats. The added [MASK] token of the
absorbing process has id vocab_size: its embedding row exists, and the output columns are the data's vocabulary
(plus the mask column where the parameterisation reads it).
"""
import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...config import ConfigError, LLMconfig, Trainconfig, require
from ...targets import IGNORE, LabelRules
from ..chunked_loss import chunk_tokens, matmul_dtype

TIME_FREQUENCIES = 128  # sinusoid pairs of the time embedding


class Schedule:
    """The continuous-time noise schedule of mdlm and sedd: alpha(t), the probability that a token is still clean at
    time t in [0, 1], its derivative, and the total noise sigma(t) = -log alpha(t) with its derivative."""

    def __init__(self, config: LLMconfig):
        self.kind, self.eps = config.noise_schedule, config.noise_eps
        self.sigma_min, self.sigma_max = config.sigma_min, config.sigma_max

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t) (same shape as t)."""
        if self.kind == "loglinear":
            return 1 - (1 - self.eps) * t
        if self.kind == "cosine":
            return self.eps + (1 - self.eps) * torch.cos(math.pi / 2 * t)
        if self.kind == "cosinesqr":
            return self.eps + (1 - self.eps) * torch.cos(math.pi / 2 * t) ** 2
        return torch.exp(-self.sigma(t))

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt (same shape as t)."""
        if self.kind == "loglinear":
            return torch.full_like(t, -(1 - self.eps))
        if self.kind == "cosine":
            return -(1 - self.eps) * math.pi / 2 * torch.sin(math.pi / 2 * t)
        if self.kind == "cosinesqr":
            return -(1 - self.eps) * math.pi / 2 * torch.sin(math.pi * t)
        return -self.dsigma(t) * torch.exp(-self.sigma(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The total noise sigma(t) = -log alpha(t)."""
        if self.kind == "geometric":
            return self.sigma_min ** (1 - t) * self.sigma_max ** t
        return -torch.log(self.alpha(t))

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        """d sigma / dt."""
        if self.kind == "geometric":
            return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)
        return -self.dalpha(t) / self.alpha(t)

    def masking_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)) = sigma'(t) / (e^sigma(t) - 1): the weight of a masked token's cross-entropy in
        the continuous-time NELBO of absorbing diffusion (1/t for loglinear)."""
        if self.kind == "loglinear":
            return 1 / t
        return -self.dalpha(t) / (1 - self.alpha(t))


def stratified_times(uniforms: torch.Tensor, antithetic: bool) -> torch.Tensor:
    """Times u (B,) in [0, 1) from one uniform number per row: row b's in [b/B, (b+1)/B) when antithetic (MDLM's
    low-discrepancy sampler), else the numbers themselves."""
    if not antithetic:
        return uniforms
    rows = uniforms.shape[0]
    return (uniforms + torch.arange(rows, dtype=uniforms.dtype)) / rows  # (B,)


def noised(x0: torch.Tensor, move: torch.Tensor, replace: torch.Tensor, moved: torch.Tensor, graph: str,
           mask_id: int, vocab_size: int) -> torch.Tensor:
    """x_t (B, T): each token of x0 (B, T) whose draw `move` (B, T) falls below its probability `moved` (B, 1 or T)
    becomes the mask (absorbing) or the token floor(replace * vocab_size) (uniform, possibly itself)."""
    hit = move < moved  # (B, T)
    if graph == "absorbing":
        return torch.where(hit, mask_id, x0)
    drawn = (replace * vocab_size).long().clamp(max=vocab_size - 1)  # (B, T)
    return torch.where(hit, drawn, x0)


class Noising:
    """The batching of a diffusion objective: rows of block_size clean tokens become (x_t, x0 as targets, time (B,)).
    Three uniform numbers per token: whether it is noised, the token a uniform graph draws for it, and (the first
    token's) the row's time. Tokens whose label is ignored under the dataset's rules (special tokens, padding) stay
    clean and are not scored. `time_of(u)` maps the stratified uniforms to times, `noise_of(time)` gives each row's
    probability (B, 1) that a token is noised."""

    extra_tokens = 0
    draws = 3
    extras = ("time",)

    def __init__(self, rules: LabelRules | None, train: Trainconfig, graph: str, mask_id: int, vocab_size: int,
                 time_of: Callable[[torch.Tensor], torch.Tensor],
                 noise_of: Callable[[torch.Tensor], torch.Tensor]):
        self.table = None if rules is None else rules.table
        self.antithetic, self.graph, self.mask_id, self.vocab_size = train.antithetic_time, graph, mask_id, vocab_size
        self.time_of, self.noise_of = time_of, noise_of

    def __call__(self, rows: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        move, replace, row_draws = uniforms  # (B, T) each
        time = self.time_of(stratified_times(row_draws[:, 0].double(), self.antithetic)).float()  # (B,)
        x0 = rows if self.table is None else self.table[rows]  # (B, T) labels, IGNORE for special tokens
        scored = x0 != IGNORE  # (B, T)
        move = torch.where(scored, move, 1.0)  # unscored tokens are never noised
        x_t = noised(rows, move, replace, self.noise_of(time)[:, None], self.graph, self.mask_id, self.vocab_size)
        return x_t, x0, time


def check_vocabulary(rules: LabelRules | None, kind: str) -> None:
    """A diffusion objective reads the data's tokens as its classes: a label table that renames them is refused."""
    if rules is not None and not bool((rules.table[rules.table != IGNORE] ==
                                       torch.arange(len(rules.table))[rules.table != IGNORE]).all()):
        raise ConfigError(f"objective={kind} scores the tokens themselves, but the dataset's tokenizer "
                          f"{rules.tokenizer!r} maps tokens to other labels; prepare the data with another tokenizer")


class TimeEmbedding(nn.Module):
    """The diffusion time t (B,) as a vector (B, C): sinusoids of 1000 t at TIME_FREQUENCIES geometric frequencies
    (as DDPM's timestep embedding), then Linear, SiLU, Linear. The model adds it to every position's token
    embedding (as D3PM's text models do) before the first block. Its output layer starts at zero (as DiT's
    adaLN-Zero), so that a new model is the unconditioned one and learns how much the time matters."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = nn.Linear(2 * TIME_FREQUENCIES, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def start_at_zero(self) -> None:
        """Zeroes the output layer (called once the model's weights are initialised)."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(10_000) * torch.arange(TIME_FREQUENCIES, device=time.device) / TIME_FREQUENCIES)
        angles = 1000 * time.float()[:, None] * freqs  # (B, F)
        sinusoids = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.fc.weight.dtype)  # (B, 2F)
        return self.proj(nn.functional.silu(self.fc(sinusoids)))  # (B, C)


def token_terms(hidden: torch.Tensor, weight: torch.Tensor, columns: int, term: Callable, *per_token: torch.Tensor,
                chunk: int | None = None) -> torch.Tensor:
    """term(logits (n, columns) fp32, *per_token chunks) -> (n,) for every token, over chunks of tokens: hidden (N,
    C), weight (V_padded, C), per_token tensors with N rows. Under autograd each chunk is recomputed in backward, so
    the logits of all tokens are never held at once. Returns (N,) fp32."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    w = weight[:columns]  # (columns, C)

    def one_chunk(h: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        dtype = matmul_dtype(weight)
        logits = (h.to(dtype) @ w.to(dtype).T).float()  # (n, columns)
        return term(logits, *rest)

    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for pieces in zip(hidden.split(chunk), *(t.split(chunk) for t in per_token)):
        parts.append(checkpoint(one_chunk, *pieces, use_reentrant=False) if grad else one_chunk(*pieces))
    return torch.cat(parts)  # (N,)


class DiffusionLoss(nn.Module):
    """The base of the diffusion loss modules: `terms(hidden, weight, x0, x_t, time)` gives each token's term (N,)
    (0 where unscored); the loss is their sum over the scored tokens (targets not IGNORE) divided by their number.
    `output_columns` are the logits' columns (the vocabulary, or it and the mask column); `predictor` is the
    reverse step `reverse_step` takes, one of `predictors`.

    Evaluation sums each batch's loss and its square, so that the figures carry the Monte-Carlo standard error of
    the mean over batches (`loss_se`) beside the mean (`loss`, the NELBO per token in nats) and the perplexity
    bound exp(loss) (`ppl_bound`).
    """

    eval_logits = False
    predictors: tuple[str, ...] = ()  # the samplers' reverse steps (sample.py --sampler), the default first

    def __init__(self, config: LLMconfig, output_columns: int):
        super().__init__()
        self.predictor = self.predictors[0]
        self.vocab_size, self.mask_id, self.output_columns = config.vocab_size, config.vocab_size, output_columns
        self.graph = config.diffusion_graph  # mdlm reads none: the default, absorbing
        self.chunk: int | None = None

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None, return_logits: bool,
                token_weights: torch.Tensor | None = None, inputs: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if token_weights is not None:
            raise ConfigError("the diffusion objectives weigh their tokens by the time; their batching gives no token "
                              "weights")
        logits = None
        if targets is None or return_logits:
            logits = nn.functional.linear(hidden, weight[: self.output_columns])  # (B, T, columns)
        if targets is None:
            return logits, None
        if time is None:
            raise ValueError("a diffusion objective's loss needs the time of each row (the batching's third part)")
        B, T = targets.shape
        scored = targets != IGNORE  # (B, T)
        x0 = torch.where(scored, targets, 0)  # (B, T) a valid id everywhere
        per_token = token_terms(hidden.reshape(B * T, -1), weight, self.output_columns, self.token_loss,
                                x0.reshape(-1), inputs.reshape(-1), time[:, None].expand(B, T).reshape(-1),
                                chunk=self.chunk)  # (B*T,)
        loss = (per_token * scored.reshape(-1)).sum() / scored.sum().clamp(min=1)
        return logits, loss

    def token_loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor
                   ) -> torch.Tensor:
        """Each token's term of the loss (n,) from its logits (n, output_columns) fp32, clean token x0, noised
        token x_t and time (n,) each."""
        raise NotImplementedError

    # ---------------------------------------------------------------- sampling (llm.denoise)

    def times(self, steps: int) -> list[float]:
        """The times of a `steps`-step reverse process, from 1 down to its last time."""
        raise NotImplementedError

    def prior(self, shape: tuple[int, int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """x at t = 1 (B, T): all masks for an absorbing process, uniform tokens for a uniform one."""
        if self.graph == "absorbing":
            return torch.full(shape, self.mask_id, device=device)
        return torch.randint(0, self.vocab_size, shape, generator=generator, device=device)

    def reverse_step(self, logits: torch.Tensor, x: torch.Tensor, t: float, s: float,
                     generator: torch.Generator) -> torch.Tensor:
        """x_s (B, T) drawn from the model's reverse process given x_t (B, T) and its output logits (B, T, columns)
        at time t; s < t."""
        raise NotImplementedError

    def finish(self, logits: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The clean tokens (B, T) from the last x and the model's output at the last time (noise removal)."""
        raise NotImplementedError

    def eval_sums(self, out, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch's loss () and its square ()."""
        loss = out.loss.float()
        return {"loss": loss, "loss_sq": loss * loss}

    def eval_figures(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        """The mean NELBO per token over `batches` batches, the perplexity bound and, from two batches on, the mean's
        standard error."""
        mean = sums["loss"] / batches
        figures = {"loss": mean, "ppl_bound": math.inf if mean > 709 else math.exp(mean)}
        if batches >= 2:
            variance = max(0.0, sums["loss_sq"] / batches - mean * mean) * batches / (batches - 1)
            figures["loss_se"] = math.sqrt(variance / batches)
        return figures


def sample_categorical(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of nonnegative, not necessarily normalised weights (..., K): the argmax of weights / E with
    E ~ Exp(1) drawn from `generator` (the exponential race, which draws index k with probability w_k / sum w)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
    race = -torch.log1p(-u)  # (..., K) Exp(1)
    return (weights.double().clamp(min=0) / race).argmax(dim=-1)


def check_common(config: LLMconfig, kind: str) -> None:
    """The rules every diffusion objective shares: noise_eps in (0, 1), geometric sigmas in order, the cross-entropy
    loss setting and the gpt architecture."""
    require(0 < config.noise_eps < 1, f"noise_eps={config.noise_eps} must be in (0, 1) (MDLM and SEDD: 1e-3)")
    require(0 < config.sigma_min < config.sigma_max,
            f"sigma_min={config.sigma_min} and sigma_max={config.sigma_max} must satisfy 0 < sigma_min < sigma_max")
    require(config.loss == "ce", f"loss={config.loss} is a token cross-entropy variant; objective={kind} has its own "
                                 "loss; drop --loss")
    require(config.arch == "gpt", f"objective={kind} runs on the gpt architecture (its time embedding enters the "
                                  f"token embedding), not arch={config.arch}; use --arch gpt")


CONTINUOUS_FIELDS = ("noise_schedule", "noise_eps", "sigma_min", "sigma_max", "time_conditioning")  # mdlm's, sedd's

