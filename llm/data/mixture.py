"""Weighted mixtures of prepared datasets (`--data_mix 'fineweb:0.7,tinystories:0.2,shakespeare:0.1'`)."""
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..targets import Batching
from .loader import TokenLoader, rank_batch
from .tokenizers import TOKENIZER_KEYS


def check_same_tokenizer(metas: dict[str, dict]) -> None:
    """Every dataset of a mixture was tokenized alike; a mismatch is one line naming two of them."""
    (first, first_meta), *others = metas.items()
    reference = {k: first_meta.get(k) for k in TOKENIZER_KEYS}
    for name, meta in others:
        differing = [k for k in TOKENIZER_KEYS if meta.get(k) != reference[k]]
        if differing:
            key = differing[0]
            raise ConfigError(f"data_mix: datasets {first!r} and {name!r} use different tokenizers ({key} "
                              f"{reference[key]!r} vs {meta.get(key)!r}); prepare them with the same --tokenizer")


class MixtureLoader:
    """Batches whose rows come from several datasets: each row's source is drawn by weight from a seeded generator,
    then taken from that source's own loader (its order, position and generator), so a run is deterministic,
    resumes exactly and splits across ranks like a single dataset. `tokens_seen` counts the global tokens drawn
    from each source."""

    def __init__(self, sources: dict[str, TokenLoader], weights: dict[str, float], seed: int, batch_size: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, batching: Batching | None = None):
        self.sources, self.names = sources, list(sources)
        self.weights = torch.tensor([weights[name] for name in self.names], dtype=torch.float64)  # (S,)
        self.batch_size, self.device, self.rank, self.world_size = batch_size, device, rank, world_size
        self.batching = batching
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens_seen = {name: 0 for name in self.names}
        first = sources[self.names[0]]
        self.path = Path(first.path.parent.name)  # for messages
        self.n_offsets = min(source.n_offsets for source in sources.values())

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This rank's (x, y), each (batch_size, block_size), from the next global batch (with the objective's
        token weights third when its batching gives them)."""
        count = self.batch_size * self.world_size
        choice = torch.multinomial(self.weights, count, replacement=True, generator=self.generator)  # (count,)
        rows: list[np.ndarray | None] = [None] * count
        for s, name in enumerate(self.names):
            where = (choice == s).nonzero().squeeze(1).tolist()
            if where:
                source = self.sources[name]
                for i, row in zip(where, source.global_rows(len(where))):
                    rows[i] = row
                self.tokens_seen[name] += len(where) * source.block_size
        return rank_batch(rows, self.generator, self.batching, self.rank, self.batch_size, self.device)

    def state_dict(self) -> dict:
        """The generator, tokens seen and every source's state (tensors, ints and strings only)."""
        return {"order": "mixture", "generator": self.generator.get_state(), "tokens_seen": dict(self.tokens_seen),
                "sources": {name: source.state_dict() for name, source in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict(); a state of another mixture (or of a single dataset) is refused."""
        saved = sorted(state.get("sources", {})) if state.get("order") == "mixture" else None
        if saved != sorted(self.names):
            raise ConfigError(f"the checkpoint was trained on {'--dataset' if saved is None else saved}, not on the "
                              f"mixture {self.names}; resume with the data it was trained on")
        self.generator.set_state(state["generator"])
        self.tokens_seen = dict(state["tokens_seen"])
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
