"""Which keys a sliding window lets a query see: the rule that attention kernels, block masks and generation caches
share."""
import torch


def in_window(query: torch.Tensor, key: torch.Tensor, window: int | torch.Tensor, causal: bool,
              unit: int = 1) -> torch.Tensor:
    """True where the query at sequence index `query` sees the key at index `key` (broadcast) within a sliding window
    of `window` tokens counted in units of `unit` tokens (window a multiple of unit): with u = unit,
    query // u - key // u < window // u and key <= query (causal), or |query // u - key // u| < window // u. With
    unit 1: 0 <= query - key < window, or |query - key| < window."""
    if unit == 1:
        distance, span = query - key, window
    else:
        distance, span = query // unit - key // unit, window // unit
    near = distance.abs() < span
    return near & (query >= key) if causal else near
