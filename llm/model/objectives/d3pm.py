"""`objective: d3pm`, discrete-time diffusion (Austin et al. 2021, D3PM) over T = diffusion_steps steps:
q(x_t | x_{t-1}) = Cat(x_{t-1} Q_t) with Q_t = (1 - beta_t) I + beta_t 1 e_m^T (absorbing: to the added [MASK]) or
(1 - beta_t) I + beta_t 11^T / K (uniform), so that q(x_t | x0) keeps x0 with probability abar_t = prod (1 - beta_i).
The model predicts x0 (its logits over the K classes: the vocabulary, plus the mask column for the absorbing
graph), and p(x_{t-1} | x_t) is proportional to q(x_t | x_{t-1}) sum_x0 p(x0 | x_t) q(x_{t-1} | x0) (D3PM's x0
parameterisation). A row's loss is T times one uniformly drawn term of the bound: KL(q(x_{t-1} | x_t, x0) ||
p(x_{t-1} | x_t)) for t >= 2, -log p(x0 | x_1) at t = 1, plus the prior's KL(q(x_T | x0) || p(x_T)), and in training the
hybrid term hybrid_weight * -log p(x0 | x_t) (validation reports the bound alone)."""
import math

import torch

from ...config import LLMconfig, Trainconfig, require
from ...targets import LabelRules
from ..kinds import ObjectiveKind
from .diffusion import DiffusionLoss, Noising, check_common, check_vocabulary, sample_categorical

COSINE_OFFSET = 0.008  # Nichol and Dhariwal's s of the cosine schedule
MAX_BETA = 0.999


def keep_probabilities(schedule: str, steps: int, graph: str = "uniform") -> torch.Tensor:
    """abar_t for t = 0..T (T + 1,) fp64: loglinear beta_t = 1 / (T - t + 1), so abar_t = 1 - t / T exactly;
    cosine (Hoogeboom et al.) beta_t = min(1 - f(t) / f(t - 1), 0.999), f(t) = cos((t / T + s) / (1 + s) pi / 2),
    so abar_t = f(t) / f(0) until the cap; the absorbing graph needs no cap (its last step masks what is left:
    abar_T = 0, so that the prior, all masks, is exact)."""
    t = torch.arange(steps + 1, dtype=torch.float64)
    if schedule == "loglinear":
        return 1 - t / steps
    f = torch.cos((t / steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2)  # (T + 1,)
    betas = 1 - f[1:] / f[:-1]  # (T,)
    if graph == "absorbing":
        betas[-1] = 1.0
    else:
        betas = betas.clamp(max=MAX_BETA)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


class D3PMLoss(DiffusionLoss):
    """D3PM's bound over K columns (absorbing: the vocabulary and the mask; uniform: the vocabulary), its
    transition algebra in closed form, and ancestral sampling."""

    predictors = ("ancestral",)

    def __init__(self, config: LLMconfig):
        self.graph = config.diffusion_graph
        super().__init__(config, config.vocab_size + (self.graph == "absorbing"))
        self.steps, self.hybrid_weight = config.diffusion_steps, config.hybrid_weight
        self.register_buffer("abar", keep_probabilities(config.noise_schedule, self.steps, self.graph),
                             persistent=False)

    def step_of(self, time: torch.Tensor) -> torch.Tensor:
        """The integer step t in 1..T of a time t / T."""
        return torch.round(time.double() * self.steps).long().clamp(1, self.steps)

    # ---------------------------------------------------------------- the transition algebra

    def mixed(self, probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """probs Qbar (n, K): the distribution after noising a distribution over x (n, K) with keep probability keep
        (n,): keep * probs plus (1 - keep) on the mask (absorbing) or spread uniformly (uniform)."""
        out = keep[:, None] * probs
        if self.graph == "absorbing":
            return out.index_add(1, torch.tensor([self.mask_id], device=probs.device), (1 - keep)[:, None])
        return out + ((1 - keep) / probs.shape[-1])[:, None]

    def likelihood(self, x_t: torch.Tensor, keep: torch.Tensor, classes: int) -> torch.Tensor:
        """q(x_t | x_s = y) for every y (n, K), where the step from s to t keeps a token with probability keep."""
        same = torch.nn.functional.one_hot(x_t, classes).double()  # (n, K)
        if self.graph == "absorbing":
            at_mask = (x_t == self.mask_id)[:, None]
            return torch.where(at_mask, 1 - keep[:, None] + keep[:, None] * same, keep[:, None] * same)
        return keep[:, None] * same + ((1 - keep) / classes)[:, None]

    def posterior(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor
                  ) -> torch.Tensor:
        """p(x_s | x_t) (n, K) proportional to q(x_t | x_s) sum_x0 x0_probs(x0) q(x_s | x0), for steps s < t (n,):
        q(x_s | x_t, x0) when x0_probs is one-hot, the model's reverse step when it is the model's p(x0 | x_t)."""
        keep_step = self.abar[t] / self.abar[s]  # (n,) q(x_t | x_s) keeps a token with this probability
        joint = self.likelihood(x_t, keep_step, x0_probs.shape[-1]) * self.mixed(x0_probs, self.abar[s])  # (n, K)
        return joint / joint.sum(-1, keepdim=True).clamp(min=1e-300)

    # ---------------------------------------------------------------- the loss

    def token_loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor
                   ) -> torch.Tensor:
        t = self.step_of(time)  # (n,)
        log_p = logits.double().log_softmax(-1)  # (n, K) the model's x0
        nll = -log_p.gather(1, x0[:, None]).squeeze(1)  # (n,)
        K = logits.shape[-1]
        one_hot = torch.nn.functional.one_hot(x0, K).double()
        s = (t - 1).clamp(min=1)
        q = self.posterior(one_hot, x_t, t, s)  # (n, K)
        p = self.posterior(log_p.exp(), x_t, t, s)
        kl = (torch.xlogy(q, q) - torch.xlogy(q, p.clamp(min=1e-300))).sum(-1)  # (n,)
        first = nll if self.graph == "uniform" else torch.where(x_t == self.mask_id, nll, 0.0)  # -log p(x0 | x_1)
        bound = self.steps * torch.where(t == 1, first, kl) + self.prior_kl(x0, K)
        if self.training and self.hybrid_weight:
            bound = bound + self.hybrid_weight * nll
        return bound.float()

    def prior_kl(self, x0: torch.Tensor, classes: int) -> torch.Tensor:
        """KL(q(x_T | x0) || p(x_T)) per token (n,): 0 for the absorbing graph (abar_T = 0, checked), against the
        uniform distribution for the uniform graph."""
        if self.graph == "absorbing":
            return torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)
        keep = self.abar[-1]
        stay, other = keep + (1 - keep) / classes, (1 - keep) / classes
        kl = stay * math.log(stay * classes) + (classes - 1) * other * (math.log(other * classes) if other > 0 else 0)
        return torch.full(x0.shape, float(kl), dtype=torch.float64, device=x0.device)

    # ---------------------------------------------------------------- sampling

    def times(self, steps: int) -> list[float]:
        """`steps` + 1 times t / T, evenly spaced steps from T down to 0 (every step when steps = T)."""
        grid = torch.linspace(self.steps, 0, steps + 1).round().long().unique_consecutive()
        return (grid.double() / self.steps).tolist()

    def reverse_step(self, logits: torch.Tensor, x: torch.Tensor, t: float, s: float,
                     generator: torch.Generator) -> torch.Tensor:
        """x_s drawn from the x0-parameterised posterior; at s = 0 the model's x0 (finish)."""
        if round(s * self.steps) == 0:
            return self.finish(logits, x, generator)
        B, T, K = logits.shape
        n = B * T
        steps = lambda v: torch.full((n,), round(v * self.steps), device=x.device)  # noqa: E731
        probs = self.posterior(logits.double().softmax(-1).reshape(n, K), x.reshape(n), steps(t), steps(s))
        return sample_categorical(probs, generator).reshape(B, T)

    def finish(self, logits: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x0 drawn from the model's p(x0 | x_1), the distribution the bound's last term scores (D3PM's code takes
        its argmax instead, which skews the samples toward likely tokens); the absorbing graph keeps unmasked
        tokens."""
        drawn = sample_categorical(logits[..., : self.vocab_size].double().softmax(-1), generator)  # (B, T)
        return torch.where(x == self.mask_id, drawn, x) if self.graph == "absorbing" else drawn


def batching(rules: LabelRules | None, train: Trainconfig, config: LLMconfig) -> Noising:
    """Noising at a step t uniform in 1..T per row, keeping a token with probability abar_t."""
    check_vocabulary(rules, "d3pm")
    T = config.diffusion_steps
    abar = keep_probabilities(config.noise_schedule, T, config.diffusion_graph)
    return Noising(rules, train, config.diffusion_graph, config.vocab_size, config.vocab_size,
                   lambda u: (torch.floor(u * T) + 1).clamp(max=T) / T,
                   lambda time: 1 - abar[torch.round(time.double() * T).long()])


def validate(config: LLMconfig) -> None:
    """D3PM's rules: T >= 1, its two schedules, a nonnegative hybrid weight and the time embedding."""
    check_common(config, "d3pm")
    require(config.diffusion_steps >= 1, f"diffusion_steps={config.diffusion_steps} must be >= 1 (D3PM: 1000)")
    require(config.noise_schedule in ("loglinear", "cosine"),
            f"noise_schedule={config.noise_schedule}: d3pm has loglinear (beta_t = 1/(T - t + 1)) and cosine "
            "(Hoogeboom's betas); use one of them")
    require(config.hybrid_weight >= 0, f"hybrid_weight={config.hybrid_weight} must be >= 0 (D3PM's text: 0.01)")
    require(config.time_conditioning is not False,
            "time_conditioning=False: d3pm's reverse steps depend on t, which the model must read; drop "
            "--time_conditioning False")


D3PM = ObjectiveKind("d3pm", D3PMLoss, batching, causal=False, diffusion=True, added_tokens=1,
                     time_conditioned=lambda config: True, nats_per_token=True, validate=validate,
                     fields=("noise_schedule", "diffusion_graph", "diffusion_steps", "hybrid_weight",
                             "time_conditioning"),
                     generation_refusal="objective='d3pm' is a diffusion model: it samples by denoising whole "
                                        "sequences (python sample.py --ckpt RUN --steps N), not left to right")
