"""The language model: embeddings, a stack of per-layer blocks, final norm and output head."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LLMconfig
from .block import Block
from .norms import build_norm
from .positions import POSITIONS

VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of 64 for faster matmuls


def padded_vocab_size(vocab_size: int) -> int:
    """vocab_size rounded up to a multiple of 64."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class LLM(nn.Module):
    """A decoder-only language model built from an `LLMconfig` and its list of per-layer specs."""

    def __init__(self, config: LLMconfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("LLMconfig.vocab_size is unset; set it or take it from the dataset's meta.json")
        self.config = config
        self.act_recomp = False  # recompute each block's activations in backward (set by the trainer)
        vocab = padded_vocab_size(config.vocab_size)
        self.tok_emb = nn.Embedding(vocab, config.n_embd)
        self.pos_emb = POSITIONS[config.pos_emb](config) if config.pos_emb in POSITIONS else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(block, config) for block in config.layers)
        self.ln_f = build_norm(config)
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale residual projections by depth
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids idx (B, T), and the mean cross-entropy when targets are given.

        Targets equal to -1 are ignored.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(T)  # (B, T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.act_recomp and self.training else block(x)
        logits = self.lm_head(self.ln_f(x))[..., : self.config.vocab_size]  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def get_num_params(self) -> tuple[int, int]:
        """(total, active) parameter counts; tied weights count once, padded vocabulary rows included.

        Active parameters are those a token uses (equal to total for dense models).
        """
        total = sum(p.numel() for p in self.parameters())
        return total, total
