"""Feed-forward kinds, one file each; `llm/model/registry.py` binds them to the layer's `ffn` string."""
