"""The diffusion families of the modded-nanogpt configs (d3pm.yaml, mdl.yaml, sedd.yaml) mapped onto the papers'
algorithms: each key takes its meaning in D3PM, MDLM or SEDD. That repository's own models are not followed where
they depart from the papers (a causal denoiser, a mask id that is GPT-2's end-of-text, cosine betas that never add
noise, a next-token loss beside SEDD's): the denoiser here is bidirectional and the [MASK] an added id.

The backbone is the one those files build, GPT-2 blocks (learned positions, LayerNorm with biases, GELU), over the
file's d_model, num_heads and n_layers.
"""
from dataclasses import replace

from ..config import BlockConfig
from .common import Unmapped, take

DIFFUSION_FAMILIES = {"d3pm": "d3pm", "mdl": "mdlm", "sedd": "sedd"}
GRAPHS = {"absorbing": "absorbing", "uniform": "uniform"}
SAMPLING_KEYS = {"sampling_timesteps": "--steps", "num_sampling_steps": "--steps", "sar_chunk_size": "--stride"}
"""Sampling settings: they belong to sample.py, not to training."""


def diffusion_family(family: str, model: dict, block: BlockConfig, cfg: dict, train: dict, unmapped: Unmapped):
    """model and block for the family's objective, and its keys mapped (train: antithetic_time)."""
    model.update(objective=DIFFUSION_FAMILIES[family], pos_emb="learn", norm="layer", bias=True)
    block = replace(block, non_linearity="gelu_tanh")
    for key, flag in SAMPLING_KEYS.items():
        if key in cfg:
            unmapped.note(f"model_cfg.{key}={take(cfg, key)}", f"a sampling setting: pass {flag} to sample.py")
    mask = take(cfg, "absorbing_state_idx", -1)
    if mask != -1:
        unmapped.refuse("model_cfg.absorbing_state_idx", f"{mask}; the [MASK] is an added id here (vocab_size), never "
                                                         "an existing token such as GPT-2's end-of-text")
    {"d3pm": _d3pm, "mdl": _mdlm, "sedd": _sedd}[family](model, cfg, train, unmapped)
    return model, block


def _graph(model: dict, cfg: dict, unmapped: Unmapped) -> str:
    graph = take(cfg, "transition_type", "absorbing")
    if graph not in GRAPHS:
        unmapped.refuse("model_cfg.transition_type", f"{graph!r}; the graphs here are absorbing and uniform")
        return "absorbing"
    model["diffusion_graph"] = GRAPHS[graph]
    return graph


def _d3pm(model: dict, cfg: dict, train: dict, unmapped: Unmapped) -> None:
    """transition_type -> diffusion_graph, noise_schedule cosine -> Hoogeboom's cosine, mutual_info -> beta_t = 1/(T -
    t + 1), num_timesteps -> T, auxiliary_loss_weight -> the hybrid loss's lambda."""
    _graph(model, cfg, unmapped)
    schedule = take(cfg, "noise_schedule", "cosine")
    if schedule in ("cosine", "mutual_info"):
        model["noise_schedule"] = "cosine" if schedule == "cosine" else "loglinear"
    else:
        unmapped.refuse("model_cfg.noise_schedule", f"{schedule!r}; D3PM's linear betas are for the Gaussian "
                                                    "transitions; use cosine or mutual_info")
    model["diffusion_steps"] = take(cfg, "num_timesteps", 1000)
    model["hybrid_weight"] = float(take(cfg, "auxiliary_loss_weight", 0.01))
    for key in ("gaussian_beta_min", "gaussian_beta_max", "nearest_neighbors"):
        take(cfg, key)  # they set up only the Gaussian and nearest-neighbour transitions, refused above


def _mdlm(model: dict, cfg: dict, train: dict, unmapped: Unmapped) -> None:
    """alpha_type cosine -> cosinesqr (alpha = eps + (1 - eps) cos^2(pi t / 2), the closest of MDLM's schedules to
    their cos^2((t + 0.008) / 1.008 pi / 2)), linear -> loglinear (alpha linear in t); alpha_min -> noise_eps;
    use_low_discrepancy_sampler -> antithetic_time."""
    alpha = take(cfg, "alpha_type", "cosine")
    if alpha in ("cosine", "linear"):
        model["noise_schedule"] = "cosinesqr" if alpha == "cosine" else "loglinear"
    else:
        unmapped.refuse("model_cfg.alpha_type", f"{alpha!r}; MDLM's schedules are cosine and linear here")
    model["noise_eps"] = float(take(cfg, "alpha_min", 1e-3))
    for key, needed, why in (("alpha_max", 1.0, "alpha(0) is 1: no token is noised at t = 0"),
                             ("continuous_time", True, "discrete-time masked diffusion is --objective d3pm"),
                             ("use_subs_parameterization", True, "MDLM's SUBS is the parameterisation here")):
        value = take(cfg, key, needed)
        if value != needed:
            unmapped.refuse(f"model_cfg.{key}", f"{value}; {why}")
    train["antithetic_time"] = bool(take(cfg, "use_low_discrepancy_sampler", True))


def _sedd(model: dict, cfg: dict, train: dict, unmapped: Unmapped) -> None:
    """transition_type -> diffusion_graph, noise_schedule mutual_info -> loglinear (masking probability linear in t,
    SEDD's default), num_timesteps -> sampling steps; se_loss_weight must be 1 and lm_loss_weight 0 (SEDD has no
    next-token loss)."""
    _graph(model, cfg, unmapped)
    schedule = take(cfg, "noise_schedule", "mutual_info")
    if schedule == "mutual_info":
        model["noise_schedule"] = "loglinear"
    else:
        unmapped.refuse("model_cfg.noise_schedule", f"{schedule!r}; SEDD's schedules are loglinear (mutual_info) "
                                                    "and geometric (--noise_schedule geometric)")
    if "num_timesteps" in cfg:
        unmapped.note(f"model_cfg.num_timesteps={take(cfg, 'num_timesteps')}",
                      "SEDD trains in continuous time; pass --steps to sample.py")
    lm_weight = take(cfg, "lm_loss_weight", 0.0)
    if lm_weight:
        unmapped.refuse("model_cfg.lm_loss_weight", f"{lm_weight}; SEDD's loss is score entropy alone, and a "
                                                    "next-token loss needs a causal model")
    se_weight = take(cfg, "se_loss_weight", 1.0)
    if se_weight != 1.0:
        unmapped.refuse("model_cfg.se_loss_weight", f"{se_weight}; scaling the loss is scaling the learning rate")
