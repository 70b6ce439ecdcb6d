"""Model modules: pure torch, no I/O."""
from .arch import ARCHS, build_model, register_arch
from .llm import LLM, ModelOutput, padded_vocab_size

__all__ = ["ARCHS", "LLM", "ModelOutput", "build_model", "padded_vocab_size", "register_arch"]
