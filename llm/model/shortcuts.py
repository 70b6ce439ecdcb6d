"""Paths from the input into the stack of the modded-nanogpt record GPT, each an option of `arch: gpt`: value
embeddings (--value_embeds), x0 mixing (--x0_mix) and U-net skips (--unet_skips). At their neutral settings (value
lambdas (1, 0), x0 lambdas (1, 0), skip weights 0) the model is the plain pre-norm stack (tested)."""
import torch
from torch import nn

from ..config import LLMconfig


def value_embed_layers(n_layer: int, tables: int) -> dict[int, int]:
    """{layer: table} for `tables` value-embedding tables: layers 0..k-1 read tables 0..k-1 and so do the last k
    layers (the record's 012 ... 012 pattern)."""
    if tables == 0:
        return {}
    return {**{i: i for i in range(tables)}, **{n_layer - tables + i: i for i in range(tables)}}


def value_width(config: LLMconfig, i: int) -> int:
    """The width of layer i's values: its key/value heads times their size."""
    block = config.layers[i]
    kv = {"mha": block.n_head, "mqa": 1, "gqa": block.n_kv_heads}[block.attn]
    return kv * (block.head_dim or config.n_embd // block.n_head)


def scalars(values: list[list[float]] | list[float]) -> nn.Parameter:
    """Learned mixing weights, never weight-decayed."""
    param = nn.Parameter(torch.tensor(values))
    param._no_weight_decay = True
    return param


class ValueEmbeddings(nn.Module):
    """`value_embeds` embedding tables whose rows join the attention values of the layers that
    `value_embed_layers` assigns them (the attention mixes v <- l0 * v + l1 * ve). Initialised N(0, 1) as
    nn.Embedding's default, which the record keeps."""

    def __init__(self, config: LLMconfig, vocab: int):
        super().__init__()
        self.layer_table = value_embed_layers(config.n_layer, config.value_embeds)
        self.tables = nn.ModuleList(nn.Embedding(vocab, value_width(config, i)) for i in range(config.value_embeds))

    def reset_parameters(self) -> None:
        """N(0, 1) rows, after the model's own initialisation has set every embedding to its std."""
        for table in self.tables:
            nn.init.normal_(table.weight)

    def forward(self, idx: torch.Tensor, n_layer: int) -> list[torch.Tensor | None]:
        """Each layer's value embedding (B, T, width) of token ids idx (B, T), None for the layers without one."""
        rows = [table(idx) for table in self.tables]  # (B, T, width) each
        return [rows[self.layer_table[i]] if i in self.layer_table else None for i in range(n_layer)]

    def lookup_params(self) -> int:
        """Parameters read by lookup, not multiplied: left out of the FLOPs per token."""
        return sum(table.weight.numel() for table in self.tables)


class Shortcuts(nn.Module):
    """x0 mixing and U-net skips around the blocks of an L-layer stack.

    x0 mixing (x0_mix): before block i, x <- l_i0 * x + l_i1 * x0, x0 the embedded input, lambdas (1, 0) at init.
    U-net skips (unet_skips): the first L // 2 blocks are the encoder; block L - 1 - j (j < L // 2) adds
    w * (the output of block j) to its input before its x0 mixing, w learned, ones at init; with L odd the middle
    block takes none.
    """

    def __init__(self, config: LLMconfig):
        super().__init__()
        n = config.n_layer
        self.n_layer, self.n_skip = n, n // 2 if config.unet_skips else 0
        self.x0_lambdas = scalars([[1.0, 0.0]] * n) if config.x0_mix else None  # (L, 2)
        self.skip_weights = scalars([1.0] * self.n_skip) if self.n_skip else None  # (L // 2,)

    def before_block(self, i: int, x: torch.Tensor, x0: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Block i's input (B, T, C) from the stream x and the input x0 (B, T, C); pops the skip it takes."""
        first_decoder = self.n_layer - self.n_skip
        if self.n_skip and i >= first_decoder:
            x = x + self.skip_weights[i - first_decoder] * skips.pop()  # (B, T, C) the output of block L - 1 - i
        if self.x0_lambdas is not None:
            x = self.x0_lambdas[i, 0] * x + self.x0_lambdas[i, 1] * x0  # (B, T, C)
        return x

    def after_block(self, i: int, x: torch.Tensor, skips: list[torch.Tensor]) -> None:
        """Keeps an encoder block's output x (B, T, C) for its decoder block."""
        if i < self.n_skip:
            skips.append(x)
