"""Sequence-mixer kinds, one file each; `llm/model/registry.py` binds them to the layer's `attn` string."""
