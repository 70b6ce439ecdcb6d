"""Model modules: pure torch, no I/O."""
from .llm import LLM, ModelOutput, padded_vocab_size

__all__ = ["LLM", "ModelOutput", "padded_vocab_size"]
