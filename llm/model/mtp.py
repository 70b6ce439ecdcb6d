"""Multi-token prediction (`--mtp`): extra modules that learn to predict tokens further ahead, for training only.

Both kinds start from the trunk's last hidden state h⁰ (B, T, C) (before the final norm) and end in the model's
shared output head; depth k (1-based) predicts token t+k+1 at position t, so it has T-k positions (the targets past
the window are dropped), and its targets are the model's targets shifted by k (y[t+k] = x[t+k+1]; -1 is ignored).

- sequential (DeepSeek-V3, arXiv:2412.19437 §2.2): module k computes
  h'ᵏ = W [norm(hᵏ⁻¹); norm(Emb(x[t+k]))], hᵏ = Block(h'ᵏ), logits = head(normᵏ(hᵏ)),
  a chain in which each depth sees the previous depth's hidden state and the embedding of the next known token.
- parallel (Gloeckle et al. 2024, arXiv:2404.19737): head k is hᵏ = Block(h⁰), logits = head(normᵏ(hᵏ)),
  all heads reading the trunk independently.

Each module's block is built like the trunk's last layer (its spec), each module has its own final norm before the
shared head (DeepSeek-V3's shared_head.norm), and its norms are the model's `norm` kind (RMSNorm with --norm rms, as
DeepSeek-V3). The loss of each depth is the model's objective (chunked cross-entropy) on those positions.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LLMconfig, require
from .block import Block
from .kinds import HeadKind, HeadOutput
from .norms import build_norm
from .registry import OBJECTIVES


class MTPModule(nn.Module):
    """One depth: (sequential only) the projection of the normalised previous hidden state and next-token
    embedding, one block, and the final norm before the shared head."""

    def __init__(self, config: LLMconfig, sequential: bool):
        super().__init__()
        if sequential:
            self.norm_hidden = build_norm(config)
            self.norm_embedding = build_norm(config)
            self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias)
        self.block = Block(config.layers[-1], config)
        self.norm_out = build_norm(config)

    def combine(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Sequential input: W [norm(hidden); norm(embedded)], (B, T, C) each -> (B, T, C)."""
        return self.proj(torch.cat((self.norm_hidden(hidden), self.norm_embedding(embedded)), dim=-1))  # (B, T, C)


class MultiTokenPrediction(nn.Module):
    """`n_mtp_tokens` modules (sequential) or heads (parallel) on the trunk; see the module docstring."""

    def __init__(self, config: LLMconfig):
        super().__init__()
        self.sequential = config.mtp == "sequential"
        self.weight = config.mtp_lambda
        self.depths = nn.ModuleList(MTPModule(config, self.sequential) for _ in range(config.n_mtp_tokens))

    def blocks(self) -> list[Block]:
        """Each depth's block (their stats follow the trunk's layers)."""
        return [module.block for module in self.depths]

    def forward(self, model: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                token_weights: torch.Tensor | None = None) -> HeadOutput:
        """hidden (B, T, C): the trunk's last hidden state; idx, targets (B, T) the model's inputs and targets, and
        their per-token weights (B, T) if any.
        The auxiliary loss is mtp_lambda * the mean of the depths' losses plus their blocks' auxiliary losses; the
        stats hold each depth's loss as mtp/loss_K. Under the model's act_recomp each block's activations are
        recomputed in backward."""
        T = idx.shape[1]
        recompute = model.act_recomp and model.training
        losses, aux_loss, layer_stats = [], hidden.new_zeros((), dtype=torch.float32), []
        previous = hidden  # (B, T, C) h⁰
        for k, module in enumerate(self.depths, start=1):
            source = previous if self.sequential else hidden
            x = source[:, : T - k]  # (B, T-k, C): positions t whose target x[t+k+1] is in the window
            if self.sequential:
                x = module.combine(x, model.tok_emb(idx[:, k:]))  # (B, T-k, C) with the embedding of x[t+k]
            positions = torch.arange(T - k, device=idx.device)[None]  # (1, T-k)
            if recompute:
                x, aux, block_stats = checkpoint(module.block, x, positions, None, None, use_reentrant=False)
            else:
                x, aux, block_stats = module.block(x, positions)  # (B, T-k, C)
            weights = None if token_weights is None else token_weights[:, k:]  # (B, T-k)
            _, loss = model.objective(module.norm_out(x), model.head_weight(), targets[:, k:], False, weights)
            losses.append(loss)
            aux_loss = aux_loss + aux
            layer_stats.append(block_stats)
            previous = x
        aux_loss = aux_loss + self.weight * torch.stack(losses).mean()
        stats = {f"mtp/loss_{k}": loss.detach() for k, loss in enumerate(losses, start=1)}
        return HeadOutput(aux_loss, layer_stats, stats)


def validate(config: LLMconfig) -> None:
    """At least one extra token, fewer than block_size, a weight >= 0, a causal objective."""
    if config.mtp == "none":
        return
    require(1 <= config.n_mtp_tokens < config.block_size,
            f"n_mtp_tokens={config.n_mtp_tokens} must be in [1, block_size={config.block_size}) with mtp={config.mtp}; "
            "change --n_mtp_tokens or use --mtp none")
    require(config.mtp_lambda >= 0,
            f"mtp_lambda={config.mtp_lambda} must be >= 0 (the weight of the extra depths' losses)")
    require(OBJECTIVES[config.objective].causal, f"mtp={config.mtp} predicts further tokens to the right, but "
                                                 f"objective={config.objective!r} is not causal; use --objective clm "
                                                 "or --mtp none")


MTP = HeadKind("mtp", lambda config: config.mtp != "none", MultiTokenPrediction, validate)
