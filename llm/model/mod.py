"""Mixture-of-depths (Raposo et al. 2024, arXiv:2404.02258): a layer (`mod: true`) that processes only some tokens.

Training: a router, Linear(n_embd, 1), scores every token (r_t). In each sequence the k = max(1, round(capacity *
T)) tokens with the highest scores go through the block, in their original order and at their original positions
(the mixer's causal mask over the chosen tokens is then the right one); each of them becomes
x_t + sigmoid(r_t) * (block(x)_t - x_t), so the language-model loss trains the router, and the other tokens pass on
the residual stream unchanged. This top-k choice looks at the whole sequence: it is not causal.

Evaluation and generation (eval mode, or with a cache): a causal predictor, a small MLP on the stop-gradient input
trained with binary cross-entropy to predict top-k membership (the paper's auxiliary predictor), decides for each
token alone whether it is routed (its logit > 0). The block then runs on every token with an attention mask that lets
a query see only the routed keys before it and itself, which equals running it on the routed tokens alone; the
outputs of the other tokens are dropped. The generation cache remembers which tokens were routed.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BlockConfig, LLMconfig, require
from .block import Block
from .cache import TokenCache
from .kinds import BlockKind
from .registry import OBJECTIVES


def routed_tokens(capacity: float, T: int) -> int:
    """k, the tokens of a length-T sequence that a routed layer processes in training: round(capacity * T), >= 1."""
    return max(1, round(capacity * T))


def routes(config: LLMconfig, i: int) -> bool:
    """Whether layer i routes: its spec has mod, and with mod_every_other its index is odd."""
    return config.layers[i].mod and (i % 2 == 1 or not config.mod_every_other)


def routed_mask(routed: torch.Tensor, T: int, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, T, S) attention mask of the last T of S tokens: a query sees itself and the routed keys (routed (B, S))
    that `mask` (B, 1, T, S) allows, or without a mask the routed keys before it."""
    S = routed.size(1)
    query = torch.arange(S - T, S, device=routed.device)[:, None]  # (T, 1)
    key = torch.arange(S, device=routed.device)[None, :]  # (1, S)
    allowed = (key <= query)[None, None] if mask is None else mask  # (1 or B, 1, T, S)
    return allowed & (routed[:, None, None, :] | (key == query))  # (B, 1, T, S)


class RoutedCache(TokenCache):
    """A routed layer's generation cache: whether each token was routed, (B, max_len), and its mixer's cache."""

    def __init__(self, mixer_cache: TokenCache, batch: int, max_len: int, device: torch.device):
        super().__init__(batch, max_len, [()], torch.bool, device)
        self.mixer = mixer_cache

    def nbytes_per_token(self) -> int:
        return super().nbytes_per_token() + self.mixer.nbytes_per_token()

    def truncate(self, length: int) -> None:
        super().truncate(length)
        self.mixer.truncate(length)


class RoutedBlock(Block):
    """A Block that processes the tokens its router picks (training) or its predictor routes (evaluation).

    The auxiliary loss is the block's plus the predictor's binary cross-entropy against the top-k choice; the stats
    add, per call, `mod_predicted` (tokens the predictor routes), `mod_agreed` (tokens where it agrees with the
    top-k choice) and `mod_tokens` (all tokens).
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__(block, config)
        self.capacity = block.capacity
        self.block_size = config.block_size
        self.router = nn.Linear(config.n_embd, 1, bias=False)
        self.predictor = nn.Sequential(nn.Linear(config.n_embd, block.mod_predictor_dim), nn.GELU(),
                                       nn.Linear(block.mod_predictor_dim, 1))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> RoutedCache:
        return RoutedCache(self.attn.new_cache(batch, max_len, dtype, device), batch, max_len, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: RoutedCache | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """As Block.forward: x (B, T, C) at positions (B or 1, T) -> the new residual stream, aux loss and stats."""
        B, T, _ = x.shape
        scores = self.router(x).squeeze(-1)  # (B, T)
        chosen = scores.topk(routed_tokens(self.capacity, T), dim=-1).indices.sort(dim=-1).values  # (B, k)
        top_k = torch.zeros(B, T, device=x.device).scatter(1, chosen, 1.0)  # (B, T) 1 where chosen
        prediction = self.predictor(x.detach()).squeeze(-1).float()  # (B, T) logits of being chosen
        predicted = prediction > 0  # (B, T)
        if self.training and cache is None:
            x, aux, stats = self.run_chosen(x, positions, scores, chosen)
        else:
            x, aux, stats = self.run_predicted(x, positions, mask, cache, scores, predicted)
        stats = {**stats, "mod_predicted": predicted.sum(), "mod_agreed": (predicted == top_k.bool()).sum(),
                 "mod_tokens": torch.tensor(B * T, device=x.device)}
        return x, aux + F.binary_cross_entropy_with_logits(prediction, top_k), stats

    def run_chosen(self, x: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
                   chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The block on the chosen tokens (B, k) only, their updates weighted by sigmoid(score) and scattered back."""
        B, T, C = x.shape
        index = chosen[..., None].expand(-1, -1, C)  # (B, k, C)
        picked = x.gather(1, index)  # (B, k, C)
        out, aux, stats = super().forward(picked, positions.expand(B, T).gather(1, chosen))  # (B, k, C)
        weight = torch.sigmoid(scores.gather(1, chosen))[..., None]  # (B, k, 1)
        return x.scatter_add(1, index, (weight * (out - picked)).to(x.dtype)), aux, stats  # (B, T, C)

    def run_predicted(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                      cache: RoutedCache | None, scores: torch.Tensor,
                      predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The block on every token, attention restricted to routed keys; only the routed tokens (B, T) take its
        update, weighted by sigmoid(score)."""
        routed, mixer_cache = (predicted, None) if cache is None else (cache.append(predicted)[0], cache.mixer)
        out, aux, stats = super().forward(x, positions, routed_mask(routed, x.size(1), mask), mixer_cache)
        weight = torch.sigmoid(scores)[..., None]  # (B, T, 1)
        return torch.where(predicted[..., None], x + weight * (out - x), x), aux, stats  # (B, T, C)

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
        """The feed-forward layer's figures, the fraction of tokens the predictor routes (what evaluation and
        generation process) and how often it agrees with the top-k choice."""
        tokens = stats["mod_tokens"].item()
        return {**super().metrics(stats), "mod_routed_frac": stats["mod_predicted"].item() / tokens,
                "mod_predictor_acc": stats["mod_agreed"].item() / tokens}

    def skipped_params(self, T: int) -> float:
        """The block's active parameters (router and predictor excluded) times the fraction of tokens it leaves
        out in training on sequences of T."""
        own = sum(p.numel() for name, p in self.named_parameters() if not name.startswith(("router.", "predictor.")))
        return (1 - routed_tokens(self.capacity, T) / T) * (own - self.ffn.inactive_params())


    def mixing_flops(self) -> float:
        """The mixing of k routed tokens over k keys, for k of the block_size queries: (k / block_size)^2 of the
        full layer's."""
        return self.mixing * (routed_tokens(self.capacity, self.block_size) / self.block_size) ** 2


def validate(block: BlockConfig, config: LLMconfig) -> None:
    """A routed layer needs a capacity in (0, 1], a predictor, a causal objective and a kernel that takes masks."""
    if not block.mod:
        return
    require(0 < block.capacity <= 1, f"capacity={block.capacity} must be in (0, 1] (the fraction of tokens a mod "
                                     "layer processes)")
    require(block.mod_predictor_dim >= 1, f"mod_predictor_dim={block.mod_predictor_dim} must be >= 1")
    require(OBJECTIVES[config.objective].causal,
            f"mod=true routes tokens causally at evaluation, but objective={config.objective!r} is bidirectional; "
            "use --objective clm or drop mod")
    require(block.window is None,
            f"mod=true with window={block.window}: a routed layer's attention over routed keys has no sliding-window "
            "form yet; drop window on this layer or drop mod")
    require(block.attn != "nsa", "mod=true with attn='nsa': native sparse attention takes no mask over routed keys; "
                                 "use another attn on this layer or drop mod")
    require(config.attn_backend != "flash",
            "mod=true evaluates with an attention mask over the routed tokens, which flash-attn does not take; "
            "use --attn_backend auto")


def validate_routing(config: LLMconfig) -> None:
    """mod_every_other must leave some layer routed."""
    require(not config.mod_every_other or any(routes(config, i) for i in range(len(config.layers))),
            "mod_every_other=true routes only odd layers (1, 3, ...) with mod=true, and there is none; set mod on an "
            "odd layer or drop --mod_every_other")


ROUTED = BlockKind("routed", routes, RoutedBlock, validate, validate_routing)
