"""`objective: sedd`, score entropy discrete diffusion (Lou, Meng, Ermon 2024): the model's output is the log of the
concrete score s_y(x_t) = q_t(y) / q_t(x_t) for every token y, trained with the diffusion-weighted denoising score
entropy sigma'(t) * SE per token. Two graphs: absorbing (noised tokens become [MASK]; the score is scaled by
sigma: log s_y = out_y - log(e^sigma - 1) - log V, SEDD's scale_by_sigma) and uniform (noised tokens become a
uniform token; the output is the log score, 0 at the current token). The time enters as an embedding of t added to
the token embeddings. Samplers: Euler and the analytic (Tweedie tau-leaping) predictor, then SEDD's denoiser step."""
import math

import torch

from ...config import LLMconfig, Trainconfig, require
from ...targets import LabelRules
from ..kinds import ObjectiveKind
from .diffusion import (
    CONTINUOUS_FIELDS,
    DiffusionLoss,
    Noising,
    Schedule,
    check_common,
    check_vocabulary,
    sample_categorical,
)


class SEDDLoss(DiffusionLoss):
    """SEDD's score entropy over the data's vocabulary columns, and its samplers (`predictor`: euler or analytic)."""

    predictors = ("euler", "analytic")

    def __init__(self, config: LLMconfig):
        super().__init__(config, config.vocab_size)
        self.schedule, self.eps = Schedule(config), config.noise_eps

    def token_loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor
                   ) -> torch.Tensor:
        t = time.double()
        sigma, dsigma = self.schedule.sigma(t), self.schedule.dsigma(t)  # (n,) each
        esigm1 = torch.expm1(sigma).float()  # (n,)
        se = (self.absorbing_entropy if self.graph == "absorbing" else self.uniform_entropy)(logits, x0, x_t, esigm1)
        return dsigma.float() * se

    def absorbing_entropy(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, esigm1: torch.Tensor
                          ) -> torch.Tensor:
        """Score entropy at masked positions (0 elsewhere): sum_y s_y - r log s_x0 + r (log r - 1), r = 1 / (e^sigma
        - 1), with log s_y = out_y - log(e^sigma - 1) - log V; it simplifies to r (e^(lse - log V) - out_x0 + log V -
        1)."""
        log_v = math.log(out.shape[-1])
        lse, at_x0 = out.logsumexp(-1), out.gather(1, x0[:, None]).squeeze(1)  # (n,) each
        se = (torch.exp(lse - log_v) - at_x0 + log_v - 1) / esigm1  # (n,)
        return torch.where(x_t == self.mask_id, se, 0.0)

    def uniform_entropy(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, esigm1: torch.Tensor
                        ) -> torch.Tensor:
        """Score entropy of the uniform graph (SEDD's Uniform.score_entropy), the log score 0 at x_t."""
        V = out.shape[-1]
        score = out.scatter(1, x_t[:, None], 0.0)  # (n, V) log scores, 0 at the current token
        ratio = 1 - V / (esigm1 + V)  # (n,)
        same = x_t == x0
        neg = score.mean(-1)  # (n,) mean log score (minus log s_x / V, which is 0)
        neg = torch.where(same, ratio * neg, score.gather(1, x0[:, None]).squeeze(1) / esigm1 + neg)
        const = torch.where(same, (V - 1) / V * ratio * (ratio.log() - 1), ((-ratio.log() - 1) / ratio - (V - 2)) / V)
        pos = score.exp().mean(-1) - 1 / V  # (n,)
        return pos - neg + const

    # ---------------------------------------------------------------- sampling

    def scores(self, logits: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """The concrete scores (B, T, V) at time t, fp64: absorbing scaled by sigma; uniform 1 at the current token."""
        out = logits.double()
        if self.graph == "absorbing":
            esigm1 = math.expm1(self.sigma(t))
            return torch.exp(out - math.log(esigm1) - math.log(out.shape[-1]))
        return torch.exp(out.scatter(-1, x[..., None].clamp(max=out.shape[-1] - 1), 0.0))

    def sigma(self, t: float) -> float:
        """sigma(t) as a float."""
        return self.schedule.sigma(torch.tensor(t, dtype=torch.float64)).item()

    def times(self, steps: int) -> list[float]:
        """SEDD's grid: steps + 1 times from 1 down to 1e-5."""
        return torch.linspace(1, 1e-5, steps + 1, dtype=torch.float64).tolist()

    def reverse_step(self, logits: torch.Tensor, x: torch.Tensor, t: float, s: float,
                     generator: torch.Generator) -> torch.Tensor:
        score = self.scores(logits, x, t)  # (B, T, V)
        if self.predictor == "euler":
            rate = (t - s) * self.schedule.dsigma(torch.tensor(t, dtype=torch.float64)).item()
            moves = rate * score if self.graph == "absorbing" else rate * score / self.vocab_size  # (B, T, V)
        else:
            moves = self.analytic_moves(score, x, self.sigma(t) - self.sigma(s))
        return self.move(moves, x, generator)

    def analytic_moves(self, score: torch.Tensor, x: torch.Tensor, dsigma: float) -> torch.Tensor:
        """The probabilities (B, T, V) of moving to each token over a step of total noise dsigma (Tweedie
        tau-leaping: SEDD's staggered score times the transposed transition); the current token's entry is
        ignored (its probability is the rest)."""
        if self.graph == "absorbing":
            return math.expm1(dsigma) * score  # a masked token: staggered score e^dsigma s_y times 1 - e^-dsigma
        stay = math.exp(-dsigma)
        staggered = (stay - 1) / (self.vocab_size * stay) * score.sum(-1, keepdim=True) + score / stay  # (B, T, V)
        return staggered * (1 - stay) / self.vocab_size

    def move(self, moves: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x after one step: token y with probability moves_y, the current token (or the mask) with the rest."""
        if self.graph == "absorbing":
            stay = (1 - moves.sum(-1, keepdim=True)).clamp(min=0)  # (B, T, 1)
            drawn = sample_categorical(torch.cat([moves, stay], dim=-1), generator)  # V means: stay masked
            return torch.where(x == self.mask_id, drawn, x)
        moves = moves.scatter(-1, x[..., None], 0.0)
        stay = (1 - moves.sum(-1, keepdim=True)).clamp(min=0)  # (B, T, 1)
        return sample_categorical(moves.scatter(-1, x[..., None], stay), generator)

    def finish(self, logits: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """SEDD's denoiser at the last time: a masked token is drawn from its scores (absorbing); a uniform-graph
        token from the staggered score over a step of total noise sigma(1e-5)."""
        t = 1e-5
        score = self.scores(logits, x, t)
        if self.graph == "absorbing":
            return torch.where(x == self.mask_id, sample_categorical(score, generator), x)
        moves = self.analytic_moves(score, x, self.sigma(t))
        return self.move(moves, x, generator)


def batching(rules: LabelRules | None, train: Trainconfig, config: LLMconfig) -> Noising:
    """Noising with probability 1 - e^-sigma(t), t = (1 - eps) u + eps per row, on the configured graph."""
    check_vocabulary(rules, "sedd")
    schedule = Schedule(config)
    return Noising(rules, train, config.diffusion_graph, config.vocab_size, config.vocab_size,
                   lambda u: (1 - config.noise_eps) * u + config.noise_eps, lambda t: 1 - schedule.alpha(t))


def validate(config: LLMconfig) -> None:
    """SEDD's rules: the shared ones, and the time embedding, which its scores need."""
    check_common(config, "sedd")
    require(config.time_conditioning is not False,
            "time_conditioning=False: sedd's scores depend on the noise level, which the model must read; drop "
            "--time_conditioning False")
    require(config.vocab_size is None or config.vocab_size >= 2, f"vocab_size={config.vocab_size}: sedd needs >= 2")


SEDD = ObjectiveKind("sedd", SEDDLoss, batching, causal=False, diffusion=True, added_tokens=1,
                     time_conditioned=lambda config: True, nats_per_token=True, validate=validate,
                     fields=(*CONTINUOUS_FIELDS, "diffusion_graph"),
                     generation_refusal="objective='sedd' is a diffusion model: it samples by denoising whole "
                                        "sequences (python sample.py --ckpt RUN --steps N), not left to right")
