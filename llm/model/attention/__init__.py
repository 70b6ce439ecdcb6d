"""Attention kinds, chosen by the layer's `attn` string."""
from .gqa import GroupedQueryAttention
from .mla import MultiHeadLatentAttention

ATTENTION = {
    "mha": GroupedQueryAttention,
    "mqa": GroupedQueryAttention,
    "gqa": GroupedQueryAttention,
    "mla": MultiHeadLatentAttention,
}
