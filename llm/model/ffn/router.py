"""The MoE router: scores over the routed experts, top-k selection, gate weights."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BlockConfig, LLMconfig


class Routing(NamedTuple):
    """The router's decision for N tokens over E routed experts, choosing k each."""

    scores: torch.Tensor  # (N, E) fp32 affinities: softmax or sigmoid of the router logits
    indices: torch.Tensor  # (N, k) chosen experts
    weights: torch.Tensor  # (N, k) fp32 gate weights of the chosen experts (unbiased scores)
    z_loss: torch.Tensor  # () mean over tokens of logsumexp(logits)^2 (ST-MoE), 0 when its weight is 0


class Router(nn.Module):
    """A linear gate over the routed experts with softmax, sigmoid or Mixtral scores and top-k selection.

    Mixtral's gate ("mixtral") picks the k largest logits and weighs them by a softmax over those k logits only;
    its scores (for the balancing loss) are the softmax over all experts. `jitter_noise` j multiplies the router's
    inputs by noise drawn uniformly from [1 - j, 1 + j] in training (Mixtral's jitter), never in evaluation.

    With `aux_free` a per-expert bias (buffer `expert_bias`, DeepSeek-V3's auxiliary-loss-free balancing) is
    added to the scores for the selection only; gate weights always come from the unbiased scores and are
    renormalised over the chosen k when `norm_topk` is set, then multiplied by `routed_scaling_factor`.

    With `router_z_loss` the routing also gives ST-MoE's z-loss, the mean of the squared logsumexp of each token's
    router logits.

    Group-limited routing (DeepSeek-V3, `n_group` groups of consecutive experts, `topk_group` < n_group): each
    token ranks the groups by the sum of their two highest selection scores (biased where aux_free) and picks its
    k experts within its best topk_group groups only. The router runs in fp32 even under autocast.
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.n_routed = block.n_exp - block.n_shared
        self.top_k = block.n_act - block.n_shared
        self.score = block.router_score
        self.norm_topk = block.norm_topk
        self.jitter_noise = block.jitter_noise
        self.n_group, self.topk_group = block.n_group, block.topk_group
        self.scaling = block.routed_scaling_factor
        self.with_z_loss = block.router_z_loss > 0
        self.gate = nn.Linear(config.n_embd, self.n_routed, bias=False)
        bias = torch.zeros(self.n_routed) if block.aux_free else None
        self.register_buffer("expert_bias", bias)

    def forward(self, x: torch.Tensor) -> Routing:
        """Routes tokens x (N, C)."""
        x = x.float()  # (N, C)
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)  # (N, C)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x, self.gate.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)  # (N, E)
        choice = scores if self.expert_bias is None else scores + self.expert_bias  # (N, E)
        if self.topk_group < self.n_group:
            choice = self.within_best_groups(choice)  # (N, E)
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        if self.score == "mixtral":
            weights = logits.gather(1, indices).softmax(dim=-1)  # (N, k)
        else:
            weights = scores.gather(1, indices)  # (N, k)
            if self.norm_topk:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        z_loss = logits.logsumexp(dim=-1).square().mean() if self.with_z_loss else logits.new_zeros(())
        return Routing(scores, indices, weights * self.scaling, z_loss)  # weights (N, k)

    def within_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Selection scores (N, E) with -inf outside each token's topk_group best groups (ranked by the sum of
        their two highest scores)."""
        N, E = choice.shape
        grouped = choice.view(N, self.n_group, E // self.n_group)  # (N, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        best = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)  # (N, E)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Moves the selection bias towards balance: + gamma for under-loaded experts, - gamma for over-loaded ones.

        `load` (E,) counts the tokens each routed expert received over a whole optimizer step.
        """
        self.expert_bias += gamma * torch.sign(load.float().mean() - load.float())
