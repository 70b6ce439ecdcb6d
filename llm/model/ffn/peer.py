"""The PEER feed-forward kind (`ffn: peer`): a pool of up to millions of tiny experts, each token retrieving a few of
them per head through product keys (He, "Mixture of A Million Experts", 2024)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BlockConfig, LLMconfig, Trainconfig, require
from ..kinds import FeedForward, FFNKind, FFNOutput


def ceil_root(k: int, n: int) -> int:
    """The smallest integer r >= 1 with r ** n >= k (ceil(k ** (1 / n)) without floating-point error)."""
    r = max(1, round(k ** (1 / n)))
    while r ** n < k:
        r += 1
    while r > 1 and (r - 1) ** n >= k:
        r -= 1
    return r


def candidates_per_table(k: int, sizes: list[int]) -> list[int]:
    """k' per sub-key table: max(ceil(k ** (1/n)) + 2, k) for n tables, at most the table's size."""
    wanted = max(ceil_root(k, len(sizes)) + 2, k)
    return [min(wanted, size) for size in sizes]


class Peer(FeedForward):
    """Parameter-efficient expert retrieval: `num_experts` experts of `expert_hidden_size` GELU neurons each, of
    which every token uses `num_experts_per_tok` (k) per retrieval head (H heads, outputs summed).

    Per head, a query (a linear map of x, LayerNormed with `batch_norm_query`) is split into one chunk per sub-key
    table (`product_key_dim` gives the tables' sizes); chunks and sub-keys are L2-normalised, each table's top k'
    rows are kept (`candidates_per_table`), and the Cartesian product of those candidates is scored by the sum of
    its per-table scores, an expert's id being the mixed-radix number of its rows (table 0 most significant). The
    top k of these are the head's experts, weighted by a softmax over their k scores. Since k' >= k (or the whole
    table), this is the exact top k over all experts. Expert e has a down row and an up row of C * hidden values
    (two nn.Embedding tables) and adds w_e * up_e^T GELU(down_e x).

    No tensor grows with num_experts per token: retrieval holds N * H * (sum of table sizes + prod k') scores for
    N tokens, the gathered expert weights N * H * k * 2 * C * hidden values. Retrieval runs in fp32.

    Usage: in training, the forward pass returns {"usage": (num_experts,) selections per expert}; `after_step`
    adds each step's counts to the buffer `counts`, and `metrics` reports them once `report_interval` steps have
    passed since the last report (the run's peer_log_interval; set by `configure_run`), then resets them.
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        C = config.n_embd
        self.heads, self.top_k, self.hidden = block.num_heads, block.num_experts_per_tok, block.expert_hidden_size
        self.num_experts, self.query_dim = block.num_experts, block.query_dim
        self.sizes = list(block.product_key_dim)
        self.candidates = candidates_per_table(self.top_k, self.sizes)
        self.query = nn.Linear(C, self.heads * self.query_dim, bias=config.bias)
        norm = nn.LayerNorm(self.query_dim, eps=config.norm_eps, bias=config.bias) if block.batch_norm_query else None
        self.query_norm = norm
        chunk = self.query_dim // len(self.sizes)
        self.sub_keys = nn.ParameterList(nn.Parameter(torch.randn(size, chunk) * 0.02) for size in self.sizes)
        self.down = nn.Embedding(self.num_experts, C * self.hidden)
        self.up = nn.Embedding(self.num_experts, C * self.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("counts", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self.steps, self.reported_at = 0, 0  # optimizer steps seen by after_step; the step of the last report
        self.report_interval, self.hot_threshold = Trainconfig.peer_log_interval, Trainconfig.usage_threshold

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (N, C) -> each head's k chosen experts: scores (N, H, k) in fp32 and expert ids (N, H, k)."""
        N, n = x.shape[0], len(self.sizes)
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.query.bias is None else self.query.bias.float()
            q = F.linear(x.float(), self.query.weight.float(), bias).view(N, self.heads, self.query_dim)  # (N, H, D)
            norm = self.query_norm
            if norm is not None:
                norm_bias = None if norm.bias is None else norm.bias.float()
                q = F.layer_norm(q, (self.query_dim,), norm.weight.float(), norm_bias, norm.eps)  # (N, H, D)
            q = F.normalize(q.view(N, self.heads, n, -1), dim=-1)  # (N, H, n, D/n)
            scores, index = None, None
            for i, (keys, kept) in enumerate(zip(self.sub_keys, self.candidates)):
                table = q[:, :, i] @ F.normalize(keys.float(), dim=-1).T  # (N, H, size_i)
                top, rows = table.topk(kept, dim=-1)  # (N, H, k'_i)
                if scores is None:
                    scores, index = top, rows
                else:
                    scores = (scores[..., :, None] + top[..., None, :]).flatten(-2)  # (N, H, m * k'_i)
                    index = (index[..., :, None] * keys.shape[0] + rows[..., None, :]).flatten(-2)  # (N, H, m * k'_i)
            scores, best = scores.topk(self.top_k, dim=-1)  # (N, H, k)
        return scores, index.gather(-1, best)  # (N, H, k), (N, H, k)

    def forward(self, x: torch.Tensor) -> FFNOutput:
        """x (B, T, C) -> output (B, T, C), no auxiliary loss, and in training {"usage": (num_experts,) counts}."""
        B, T, C = x.shape
        N, H, k, hidden = B * T, self.heads, self.top_k, self.hidden
        flat = x.reshape(N, C)  # (N, C)
        scores, index = self.retrieve(flat)  # (N, H, k) each
        weights = scores.softmax(dim=-1)  # (N, H, k)
        down = F.embedding(index, self.down.weight).view(N, H * k * hidden, C)  # (N, H*k*hidden, C)
        up = F.embedding(index, self.up.weight).view(N, H * k * hidden, C)  # (N, H*k*hidden, C)
        h = F.gelu(down @ flat[:, :, None]).view(N, H, k, hidden)  # (N, H, k, hidden)
        h = h * weights[..., None].to(h.dtype)  # (N, H, k, hidden)
        out = (h.view(N, 1, H * k * hidden) @ up).view(N, C)  # (N, C)
        y = self.dropout(out.view(B, T, C)).to(x.dtype)  # (B, T, C)
        if not self.training:
            return self.no_aux(y)
        flat_index = index.reshape(-1)  # (N * H * k,)
        usage = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        usage.scatter_add_(0, flat_index, torch.ones_like(flat_index))  # (E,)
        return FFNOutput(y, y.new_zeros((), dtype=torch.float32), {"usage": usage})

    @torch.no_grad()
    def after_step(self, stats: dict[str, torch.Tensor]) -> None:
        """Adds the step's selections per expert (summed over micro-steps and ranks) to `counts`, on the device."""
        if "usage" in stats:
            self.counts += stats["usage"]
        self.steps += 1

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Once `report_interval` steps have passed since the last report (else nothing): the fraction of experts
        picked at least once since then (`experts_used`) and how many were picked more than `hot_threshold` times
        the mean count (`hot_experts`); the counts then start again from zero."""
        if self.steps - self.reported_at < self.report_interval:
            return {}
        counts = self.counts.float()
        used = (counts > 0).float().mean().item()
        hot = int((counts > self.hot_threshold * counts.mean()).sum().item())
        self.counts.zero_()
        self.reported_at = self.steps
        return {"experts_used": used, "hot_experts": hot}

    def configure_run(self, train: Trainconfig) -> None:
        """The run's report interval (peer_log_interval) and hot-expert threshold (usage_threshold)."""
        require(train.peer_log_interval >= 1, f"peer_log_interval={train.peer_log_interval} must be >= 1")
        require(train.usage_threshold > 0, f"usage_threshold={train.usage_threshold} must be > 0 (hot experts exceed "
                                           "this multiple of the mean count)")
        self.report_interval, self.hot_threshold = train.peer_log_interval, train.usage_threshold

    def inactive_params(self) -> int:
        """The experts a token does not use: 2 * C * expert_hidden_size * max(0, num_experts - num_heads * k)
        (each head picks k experts; an expert picked by two heads counts twice, so this is a lower bound)."""
        per_expert = self.down.weight.shape[1] + self.up.weight.shape[1]
        return per_expert * max(0, self.num_experts - self.heads * self.top_k)


def validate(block: BlockConfig, config: LLMconfig) -> None:
    """Sub-key tables whose product is the expert count, a query that splits evenly over them, k within the pool."""
    sizes, n = block.product_key_dim, len(block.product_key_dim)
    require(n >= 1 and all(size >= 1 for size in sizes),
            f"product_key_dim={sizes} must list one or more sub-key table sizes >= 1, as --product_key_dim 1024 1024")
    product = math.prod(sizes)
    require(block.num_experts == product,
            f"num_experts={block.num_experts} must equal the product of product_key_dim={sizes}, {product}; "
            f"set --num_experts {product} or change --product_key_dim")
    fixed = n * max(1, block.query_dim // n)
    require(block.query_dim >= 1 and block.query_dim % n == 0,
            f"query_dim={block.query_dim} must be a positive multiple of the {n} sub-key tables of "
            f"product_key_dim={sizes} (each table takes query_dim / {n}); use --query_dim {fixed}")
    require(1 <= block.num_experts_per_tok <= block.num_experts,
            f"num_experts_per_tok={block.num_experts_per_tok} must be in [1, num_experts={block.num_experts}]; "
            "lower --num_experts_per_tok or grow product_key_dim")
    for name in ("num_heads", "expert_hidden_size"):
        value = getattr(block, name)
        require(value >= 1, f"{name}={value} must be >= 1")


PEER = FFNKind("peer", Peer, validate, {
    "peer": dict(ffn="peer", num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2,
                 query_dim=16),
    "peer_three_tables": dict(ffn="peer", num_experts=60, product_key_dim=[3, 4, 5], num_experts_per_tok=8,
                              num_heads=2, query_dim=12, expert_hidden_size=2, batch_norm_query=False),
})
