"""The causal attention kernel: PyTorch SDPA by default, flash-attn when importable on CUDA."""
import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def flash_usable(q: torch.Tensor, v: torch.Tensor) -> bool:
    """flash-attn runs on CUDA with 16-bit inputs and equal query/value head sizes."""
    return (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.size(-1) == v.size(-1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, dropout_p: float) -> torch.Tensor:
    """Causal attention over q (B, T, H, D), k (B, T, KV, D), v (B, T, KV, Dv) with KV dividing H.

    Returns (B, T, H, Dv). The softmax scale is 1/sqrt(D).
    """
    use_flash = backend != "sdpa" and flash_usable(q, v)
    if backend == "flash" and not use_flash:
        raise RuntimeError("attn_backend=flash needs flash-attn, CUDA tensors in fp16/bf16 and equal q/v head sizes; "
                           "use --attn_backend auto")
    if use_flash:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)  # (B, T, H, Dv)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H|KV, T, D)
        dropout_p=dropout_p, is_causal=True, enable_gqa=k.size(2) != q.size(2),
    )  # (B, H, T, Dv)
    return y.transpose(1, 2)  # (B, T, H, Dv)
