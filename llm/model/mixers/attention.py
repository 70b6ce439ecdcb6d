"""What the attention kinds share: the causal attention kernel (PyTorch SDPA by default, flash-attn when importable
on CUDA) and the check of the head count."""
import torch
import torch.nn.functional as F

from ...config import BlockConfig, LLMconfig, require

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def flash_usable(q: torch.Tensor, v: torch.Tensor) -> bool:
    """flash-attn runs on CUDA with 16-bit inputs and equal query/value head sizes."""
    return (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.size(-1) == v.size(-1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, dropout_p: float,
                     mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of queries q (B, T, H, D) over keys k (B, S, KV, D) and values v (B, S, KV, Dv), KV dividing H.

    The T queries are the last T of the S positions (S > T when earlier keys come from a cache), so query t
    sees keys up to S - T + t: the causal mask is aligned to the bottom right. `mask` (B, 1, T, S), True where
    attention is allowed, replaces that rule (left-padded batches). The softmax scale defaults to 1/sqrt(D).
    Returns (B, T, H, Dv).
    """
    T, S = q.size(1), k.size(1)
    use_flash = backend != "sdpa" and mask is None and flash_usable(q, v)
    if backend == "flash" and not use_flash:
        raise RuntimeError("attn_backend=flash needs flash-attn, CUDA tensors in fp16/bf16, equal q/v head sizes and "
                           "no padding mask; use --attn_backend auto")
    if use_flash:  # flash-attn aligns its causal mask to the bottom right
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, softmax_scale=scale)  # (B, T, H, Dv)
    if mask is None and 1 < T < S:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # (T, S)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H|KV, T|S, D)
        attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T == S, scale=scale,
        enable_gqa=k.size(2) != q.size(2),
    )  # (B, H, T, Dv)
    return y.transpose(1, 2)  # (B, T, H, Dv)


def check_heads(block: BlockConfig, config: LLMconfig) -> None:
    """n_head must be positive and divide n_embd (head size = n_embd // n_head)."""
    require(block.n_head >= 1, f"n_head={block.n_head} must be >= 1")
    require(config.n_embd % block.n_head == 0,
            f"n_head={block.n_head} does not divide n_embd={config.n_embd}; choose n_head dividing n_embd")
