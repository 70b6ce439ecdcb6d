"""The Mixture-of-Experts feed-forward kind (`ffn: moe`): shared experts, routed experts and their balancing."""
from dataclasses import replace

import torch
from torch import nn

from ...config import BlockConfig, LLMconfig, require
from ..kinds import FeedForward, FFNKind, FFNOutput
from .experts import RoutedExperts
from .mlp import MLP, check_width
from .router import Router


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """Affinities (..., E) scaled to sum to 1 over the experts (softmax scores already do)."""
    return scores / scores.sum(dim=-1, keepdim=True)


def count_choices(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How often each expert was chosen in each row of indices (R, n) -> (R, n_experts), without a host sync."""
    counts = torch.zeros(indices.shape[0], n_experts, device=indices.device)
    return counts.scatter_add_(1, indices, torch.ones(indices.shape, device=indices.device))


def switch_balance_loss(scores: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch-style load balance E * sum_i f_i * P_i over all tokens and E routed experts: f_i is the fraction of
    the choices that went to expert i (from the layer's load counts (E,)), P_i the mean normalised affinity for
    expert i. Equals 1 when balanced."""
    E = scores.shape[-1]
    f = load.float() / load.sum()  # (E,)
    P = normalized(scores).mean(dim=0)  # (E,)
    return E * (f * P).sum()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss sum_i f_i * P_i, averaged over sequences: per sequence
    of T tokens, f_i = E / (k * T) * (tokens choosing i) and P_i = mean over t of the normalised affinity."""
    (N, k), E = indices.shape, scores.shape[-1]
    T = N // batch
    f = count_choices(indices.view(batch, T * k), E) * (E / (k * T))  # (B, E)
    P = normalized(scores).reshape(batch, T, E).mean(dim=1)  # (B, E)
    return (f * P).sum(dim=-1).mean()


class MoE(FeedForward):
    """n_shared shared experts that every token goes through plus n_exp - n_shared routed experts, of which each
    token uses n_act - n_shared, weighted by the router's gate weights.

    The shared experts are one MLP of width n_shared * up_dim (the same function as n_shared separate MLPs
    summed). Balancing is the Switch-style loss weighted by `coeff`, or with `aux_free` DeepSeek-V3's
    selection bias (moved by `update_bias` after each optimizer step) plus its sequence-wise loss weighted
    by `alpha`; the router's z-loss (ST-MoE) joins it weighted by `router_z_loss`.
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.aux_free = block.aux_free
        self.gamma = block.gamma
        self.balance_weight = block.alpha if block.aux_free else block.coeff
        self.z_weight = block.router_z_loss
        self.router = Router(block, config)
        self.experts = RoutedExperts(block, config)
        self.shared = MLP(replace(block, up_dim=block.n_shared * block.up_dim), config) if block.n_shared else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> FFNOutput:
        """x (B, T, C) -> output (B, T, C), the weighted balance loss (and z-loss), and stats {"load": (E,) tokens
        per routed expert}."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        route = self.router(flat)
        routed, load = self.experts(flat, route.indices, route.weights)  # (N, C), (E,)
        y = self.dropout(routed.view(B, T, C)).to(x.dtype)  # (B, T, C)
        if self.shared is not None:
            y = y + self.shared.project(x)  # (B, T, C)
        if self.aux_free:
            balance = sequence_balance_loss(route.scores, route.indices, B)
        else:
            balance = switch_balance_loss(route.scores, load)
        return FFNOutput(y, self.balance_weight * balance + self.z_weight * route.z_loss, {"load": load})

    def after_step(self, stats: dict[str, torch.Tensor]) -> None:
        """After an optimizer step: moves the aux-free selection bias by gamma from the step's loads (E,)."""
        if self.aux_free:
            self.router.update_bias(stats["load"], self.gamma)

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
        """The step's load fractions per routed expert and the max/mean load ratio (1 is perfect balance)."""
        load = stats["load"].float().cpu()
        return {"load_fractions": [round(v, 4) for v in (load / load.sum()).tolist()],
                "max_load_ratio": (load.max() / load.mean()).item()}

    def inactive_params(self) -> int:
        """Parameters of the routed experts a token does not use."""
        per_expert = sum(p[0].numel() for p in self.experts.parameters())
        return per_expert * (self.router.n_routed - self.router.top_k)


def validate(block: BlockConfig, config: LLMconfig) -> None:
    """Expert counts that leave at least one routed expert per token, a router that can learn, weights >= 0."""
    check_width(block, config)
    require(block.n_exp >= block.n_act > block.n_shared >= 0,
            f"moe needs n_exp >= n_act > n_shared >= 0, got n_exp={block.n_exp}, n_act={block.n_act}, "
            f"n_shared={block.n_shared}; each token uses n_act experts, n_shared of them shared")
    require(not (block.norm_topk and block.router_score != "mixtral" and block.n_act - block.n_shared == 1),
            "norm_topk with n_act - n_shared = 1 routed expert per token makes every gate weight 1, so the router "
            "learns nothing from the language-model loss; use --no_norm_topk or raise n_act")
    require(not (block.router_score == "mixtral" and block.n_act - block.n_shared == 1),
            "router_score=mixtral with n_act - n_shared = 1 routed expert per token makes every gate weight 1 (a "
            "softmax over one logit); raise n_act or use --router_score softmax --no_norm_topk")
    n_routed = block.n_exp - block.n_shared
    require(block.n_group >= 1 and n_routed % block.n_group == 0,
            f"n_group={block.n_group} must be >= 1 and divide the {n_routed} routed experts (n_exp - n_shared)")
    require(1 <= block.topk_group <= block.n_group,
            f"topk_group={block.topk_group} must be in [1, n_group={block.n_group}] (n_group: no group limit)")
    if block.topk_group < block.n_group:
        require(n_routed // block.n_group >= 2, f"n_group={block.n_group} leaves fewer than 2 experts per group, "
                "and groups are ranked by their two best scores; use fewer groups")
        require(block.topk_group * (n_routed // block.n_group) >= block.n_act - block.n_shared,
                f"topk_group={block.topk_group} groups of {n_routed // block.n_group} experts hold fewer than the "
                f"{block.n_act - block.n_shared} routed experts each token picks; raise topk_group")
    require(block.routed_scaling_factor > 0,
            f"routed_scaling_factor={block.routed_scaling_factor} must be > 0 (1: gate weights unscaled)")
    for name in ("coeff", "alpha", "gamma", "router_z_loss"):
        value = getattr(block, name)
        require(value >= 0, f"{name}={value} must be >= 0")
    require(0 <= block.jitter_noise < 1, f"jitter_noise={block.jitter_noise} must be in [0, 1) (0 disables it)")


MOE = FFNKind("moe", MoE, validate, {
    "moe_softmax_switch": dict(ffn="moe", n_exp=6, n_shared=1, n_act=3, up_dim=32),
    "moe_sigmoid_aux_free": dict(ffn="moe", n_exp=5, n_shared=2, n_act=4, router_score="sigmoid", aux_free=True,
                                 up_dim=24, non_linearity="swiglu"),
    "moe_group_limited": dict(ffn="moe", n_exp=9, n_shared=1, n_act=4, router_score="sigmoid", aux_free=True,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5, up_dim=16, non_linearity="swiglu"),
    "moe_mixtral_jitter": dict(ffn="moe", n_exp=4, n_shared=0, n_act=2, router_score="mixtral", jitter_noise=0.01,
                               up_dim=32, non_linearity="swiglu"),
}, summaries={"max_load_ratio": "max/mean load"})
