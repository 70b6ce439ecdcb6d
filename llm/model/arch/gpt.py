"""`arch: gpt`: pre-norm residual blocks of the layers' own kinds, as GPT-2 and Llama stack them (`LLM` itself)."""
from ..kinds import ArchKind
from ..llm import LLM

GPT = ArchKind("gpt", LLM)
