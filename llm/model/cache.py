"""Inference caches: per-token tensors of one layer (what each mixer kind stores is declared in its file), and the
batch bookkeeping shared by all layers."""
from dataclasses import dataclass

import torch

from .windows import in_window


class TokenCache:
    """Per-token tensors of one layer for B rows, (B, max_len, *shape) each, filled left to right."""

    def __init__(self, batch: int, max_len: int, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device):
        self.tensors = [torch.zeros(batch, max_len, *shape, dtype=dtype, device=device) for shape in shapes]
        self.length = 0

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stores the new tensors (B, T, *shape) after the cached ones and returns everything cached so far."""
        start, self.length = self.length, self.length + new[0].size(1)
        for cached, tensor in zip(self.tensors, new):
            cached[:, start:self.length] = tensor
        return tuple(cached[:, :self.length] for cached in self.tensors)  # (B, S, *shape) each

    def nbytes_per_token(self) -> int:
        """Bytes one token adds to this cache."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors)

    def nbytes_held(self, tokens: int) -> int:
        """Bytes this cache holds per row after `tokens` tokens."""
        return tokens * self.nbytes_per_token()

    def truncate(self, length: int) -> None:
        """Forgets every token from `length` on (the next append writes there)."""
        self.length = length


class WindowCache:
    """Per-token tensors of one sliding-window layer for B rows in a ring of min(window, max_len) slots: only the
    newest tokens are kept, so its memory stays bounded however long generation runs.

    Slot i holds the newest token whose index in the sequence is i modulo the ring's size, so the held tokens are
    out of order; `append` returns them with the attention mask that their indices give.
    """

    def __init__(self, batch: int, window: int, max_len: int, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device):
        self.window, self.size = window, min(window, max_len)
        self.tensors = [torch.zeros(batch, self.size, *shape, dtype=dtype, device=device) for shape in shapes]
        self.length = 0  # tokens appended so far

    def append(self, *new: torch.Tensor, window: int | torch.Tensor, mask: torch.Tensor | None,
               unit: int = 1) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Returns the held tokens followed by the new ones (B, size + T, *shape) each, and the mask (B, 1, T,
        size + T) of the T new queries over them: a key is seen when it was filled, is not later than the query
        and lies within `window` tokens of it (an int, or the () tensor of a training schedule; counted in blocks
        of `unit` tokens of the sequence's indices, as `in_window`), and when `mask`
        (the model's padding mask (B, 1, T, length + T) over the whole sequence, or None) allows it. Then keeps
        the newest `size` tokens in the ring."""
        B, T, device = new[0].size(0), new[0].size(1), new[0].device
        slots = torch.arange(self.size, device=device)  # (size,)
        held = (self.length - 1) - (self.length - 1 - slots) % self.size  # (size,) negative: never filled
        index = torch.cat((held, torch.arange(self.length, self.length + T, device=device)))  # (size + T,)
        queries = torch.arange(self.length, self.length + T, device=device)[:, None]  # (T, 1)
        seen = (index >= 0) & in_window(queries, index[None], window, True, unit)  # (T, size + T)
        if mask is None:
            seen = seen.expand(B, 1, T, index.numel())  # (B, 1, T, size + T)
        else:
            seen = seen & mask.gather(-1, index.clamp(min=0).expand(B, 1, T, index.numel()))  # (B, 1, T, size + T)
        keys = tuple(torch.cat((cached, tensor), dim=1) for cached, tensor in zip(self.tensors, new))
        kept = min(T, self.size)
        write = torch.arange(self.length + T - kept, self.length + T, device=device) % self.size  # (kept,)
        for cached, tensor in zip(self.tensors, new):
            cached.index_copy_(1, write, tensor[:, T - kept:])
        self.length += T
        return keys, seen  # (B, size + T, *shape) each, (B, 1, T, size + T)

    def nbytes_per_token(self) -> int:
        """Bytes one held token takes (the ring holds at most `window` of them)."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors)

    def nbytes_held(self, tokens: int) -> int:
        """Bytes this cache holds per row after `tokens` tokens: never more than its window's."""
        return min(tokens, self.window) * self.nbytes_per_token()


@dataclass
class Cache:
    """The caches of all layers for a batch of left-padded rows: `length` positions are filled, and row b's first
    pad[b] positions are padding that no query may attend to."""

    layers: list
    length: int
    pad: torch.Tensor  # (B,) left-padding tokens per row
    padded: bool  # whether any row has padding (decided once, so the forward pass needs no host sync)

    def truncate(self, length: int) -> None:
        """Forgets every position from `length` on (speculative decoding's rejected drafts) in every layer."""
        for layer in self.layers:
            layer.truncate(length)
        self.length = length

    def positions(self, T: int) -> torch.Tensor:
        """Positions (B, T) of the next T tokens of each row, counted from its first real token."""
        steps = torch.arange(self.length, self.length + T, device=self.pad.device)  # (T,)
        return (steps[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)

    def mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, S) attention mask of the next T queries over all S = length + T keys, or None without padding.

        A query sees causally earlier real tokens; a padding query sees itself, so no softmax row is empty.
        """
        if not self.padded:
            return None
        S = self.length + T
        query = torch.arange(self.length, S, device=self.pad.device)[:, None]  # (T, 1)
        key = torch.arange(S, device=self.pad.device)[None, :]  # (1, S)
        real_key = key[None] >= self.pad[:, None, None]  # (B, 1, S)
        return ((key <= query)[None] & real_key | (key == query)[None])[:, None]  # (B, 1, T, S)
