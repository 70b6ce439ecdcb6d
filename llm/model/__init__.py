"""Model modules: pure torch, no I/O."""
from .llm import LLM, padded_vocab_size

__all__ = ["LLM", "padded_vocab_size"]
