"""`objective: mdlm`, masked diffusion (Sahoo et al. 2024, MDLM): each token of a row is replaced by [MASK] with
probability 1 - alpha(t), and the model, reading the masked row with every mixer bidirectional, predicts the clean
tokens under the SUBS parameterisation (no probability on [MASK]; unmasked tokens are carried over, so only masked
positions count). The continuous-time NELBO per token is -alpha'(t) / (1 - alpha(t)) * -log p(x0 | x_t) at each masked
position (1/t under the loglinear schedule), averaged over all scored tokens. Time conditioning is off by default,
as in MDLM."""
import torch

from ...config import LLMconfig, Trainconfig
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


class MDLMLoss(DiffusionLoss):
    """MDLM's loss over the data's vocabulary columns (the mask column is never predicted), and its ancestral
    sampler (MDLM's ddpm_cache predictor: the reverse step of the absorbing process from t to s < t)."""

    predictors = ("ddpm_cache",)

    def __init__(self, config: LLMconfig):
        super().__init__(config, config.vocab_size)
        self.schedule = Schedule(config)
        self.eps = config.noise_eps

    def token_loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor
                   ) -> torch.Tensor:
        masked = x_t == self.mask_id  # (n,)
        weight = torch.where(masked, self.schedule.masking_weight(time.double()).float(), 0.0)  # (n,)
        nll = logits.logsumexp(-1) - logits.gather(1, x0[:, None]).squeeze(1)  # (n,) -log p(x0 | x_t)
        return weight * nll

    def times(self, steps: int) -> list[float]:
        """MDLM's grid: steps + 1 times from 1 down to 1e-5."""
        return torch.linspace(1, 1e-5, steps + 1, dtype=torch.float64).tolist()

    def reverse_step(self, logits: torch.Tensor, x: torch.Tensor, t: float, s: float,
                     generator: torch.Generator) -> torch.Tensor:
        """A masked token at t is unmasked at s with probability (alpha_s - alpha_t) / (1 - alpha_t), to a token
        drawn from the model's p(x0 | x_t); unmasked tokens stay."""
        alpha_t, alpha_s = (self.schedule.alpha(torch.tensor(v, dtype=torch.float64)).item() for v in (t, s))
        probs = logits.double().softmax(-1) * (alpha_s - alpha_t) / (1 - alpha_t)  # (B, T, V)
        stay = torch.full_like(probs[..., :1], (1 - alpha_s) / (1 - alpha_t))  # (B, T, 1) the mask
        drawn = sample_categorical(torch.cat([probs, stay], dim=-1), generator)  # (B, T); V means the mask
        return torch.where(x == self.mask_id, drawn, x)

    def finish(self, logits: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise removal: every token still masked becomes the model's most likely token."""
        return torch.where(x == self.mask_id, logits.argmax(-1), x)


def batching(rules: LabelRules | None, train: Trainconfig, config: LLMconfig) -> Noising:
    """Masking with probability 1 - alpha(t), t = (1 - eps) u + eps per row."""
    check_vocabulary(rules, "mdlm")
    schedule = Schedule(config)
    return Noising(rules, train, "absorbing", config.vocab_size, config.vocab_size,
                   lambda u: (1 - config.noise_eps) * u + config.noise_eps, lambda t: 1 - schedule.alpha(t))


def validate(config: LLMconfig) -> None:
    """MDLM's rules: the ones every diffusion objective shares."""
    check_common(config, "mdlm")


MDLM = ObjectiveKind("mdlm", MDLMLoss, batching, causal=False, diffusion=True, added_tokens=1,
                     time_conditioned=lambda config: bool(config.time_conditioning), nats_per_token=True,
                     validate=validate, fields=CONTINUOUS_FIELDS,
                     generation_refusal="objective='mdlm' is a diffusion model: it samples by denoising whole "
                                        "sequences (python sample.py --ckpt RUN --steps N), not left to right")
