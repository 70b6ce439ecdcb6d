"""Cross-entropy of a linear output head computed over chunks of tokens, so that the logits of all tokens are never
held at once: for N tokens, a padded vocabulary of V rows and chunks of K tokens, the loss takes O(K·V) memory
beyond its inputs instead of O(N·V).

The gradients are computed chunk by chunk in the forward pass (each chunk's logits are needed for its loss
anyway), and backward only scales them by the incoming gradient: this costs the same matmuls as the unchunked loss
and keeps for backward only a gradient the size of the hidden states and one the size of the head weight.
"""
import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MiB in fp32): 333 tokens of GPT-2's padded vocabulary
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # the largest finite value of each format
FP8_ALIGN = 16  # float8 matmuls take sizes that are multiples of 16


def chunk_tokens(rows: int) -> int:
    """Tokens per chunk for an output head of `rows` (padded) vocabulary rows."""
    return max(1, CHUNK_ELEMENTS // rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         ignore_index: int, chunk: int | None = None,
                         token_weights: torch.Tensor | None = None, softcap: float | None = None,
                         fp8: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T, restricted to the first vocab_size columns, against
    targets; tokens whose target is ignore_index count neither in the sum nor in the mean. With token_weights (N,),
    each token's term is multiplied by its weight (the mean stays over the counted tokens). With softcap c the
    logits are c * tanh(logits / c) (`soft_cap`). With fp8 the three matmuls run in float8 (`fp8_matmul`: e4m3
    hidden states and head, e5m2 gradients), as the speedrun's FP8 head.

    hidden (N, C); weight (V, C) with V >= vocab_size (rows past vocab_size are padding and are never predicted);
    targets (N,). Chunks of `chunk` tokens (default `chunk_tokens(V)`). Under autocast the matmuls run in its
    dtype; the softmax, the loss and the head's gradient are fp32 (fp64 for fp64 weights). Returns the loss (),
    NaN when every target is ignored, as `F.cross_entropy` gives.
    """
    chunk = chunk or chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, ignore_index, chunk, token_weights,
                                        softcap, fp8)
    return loss_and_grads(hidden, weight, targets, vocab_size, ignore_index, chunk, False, False, token_weights,
                          softcap, fp8)[0]


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, a_format: torch.dtype = torch.float8_e4m3fn,
               b_format: torch.dtype = torch.float8_e4m3fn, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T with both operands in float8, each scaled per tensor so that its absolute maximum maps
    to its format's largest value, accumulated and returned in out_dtype (M, N). Sizes are zero-padded to multiples
    of 16 for the kernel (torch._scaled_mm, which takes b column-major)."""
    M, N = a.shape[0], b.shape[0]
    pad_k = -a.shape[1] % FP8_ALIGN
    a = F.pad(a, (0, pad_k, 0, -M % FP8_ALIGN))  # (M', K')
    b = F.pad(b, (0, pad_k, 0, -N % FP8_ALIGN))  # (N', K')
    scale_a = a.abs().amax().float().clamp(min=1e-12) / FP8_MAX[a_format]  # ()
    scale_b = b.abs().amax().float().clamp(min=1e-12) / FP8_MAX[b_format]  # ()
    a8, b8 = (a / scale_a).to(a_format).contiguous(), (b / scale_b).to(b_format).contiguous()  # (M', K'), (N', K')
    out = torch._scaled_mm(a8, b8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)  # (M', N')
    return out[:M, :N]


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The logits squashed into (-cap, cap) by cap * tanh(logits / cap); unchanged when cap is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's for fp32 weights under autocast, else the weight's."""
    device = weight.device.type
    autocast = torch.is_autocast_enabled(device) and weight.dtype == torch.float32
    return torch.get_autocast_dtype(device) if autocast else weight.dtype


def loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   ignore_index: int, chunk: int, grad_hidden: bool, grad_weight: bool,
                   token_weights: torch.Tensor | None = None, softcap: float | None = None, fp8: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss (), its gradient w.r.t. hidden (N, C) or None, w.r.t. weight (V, C) or None), as described in
    `linear_cross_entropy`, computed over chunks of tokens without building any graph."""
    mm_dtype = matmul_dtype(weight)
    dtype = torch.promote_types(weight.dtype, torch.float32)  # of the softmax and the sums: fp32 at least
    w = weight.to(mm_dtype)  # (V, C)
    kept = targets != ignore_index  # (N,)
    count = kept.sum()
    factor = kept.to(dtype) if token_weights is None else kept * token_weights.to(dtype)  # (N,) each term's factor
    # d(mean loss)/d(logits) of a row is (softmax - one_hot(target)) * scale; scale is 0 for ignored rows, and
    # count is clamped so that when every row is ignored the gradients are 0 (and the loss NaN), as F.cross_entropy.
    scale = factor / count.clamp(min=1)  # (N,)
    safe_targets = torch.where(kept, targets, 0)  # (N,) a valid index in every row
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    d_hidden = []  # per chunk (K, C)
    d_weight = torch.zeros_like(weight, dtype=dtype) if grad_weight else None  # (V, C)
    w_t = w.T.contiguous() if fp8 and grad_hidden else None  # (C, V) the head as fp8_matmul's second operand
    for h, t, k, s in zip(hidden.to(mm_dtype).split(chunk), safe_targets.split(chunk), factor.split(chunk),
                          scale.split(chunk)):
        logits = soft_cap((fp8_matmul(h, w, out_dtype=dtype) if fp8 else h @ w.T).to(dtype), softcap)  # (K, V)
        # through the cap: d(c tanh(z / c))/dz = 1 - (capped / c)^2 (K, V)
        slope = None if softcap is None or not (grad_hidden or grad_weight) else 1 - (logits / softcap).square()
        logits[:, vocab_size:] = float("-inf")  # padding rows of the head are never predicted
        log_probs = torch.log_softmax(logits, dim=-1, out=logits)  # (K, V) in place: one fused pass, no temporary
        total = total - (log_probs.gather(1, t[:, None]).squeeze(1) * k).sum()
        if grad_hidden or grad_weight:
            grad = log_probs.exp_()  # (K, V) the softmax, in place of the logits
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # minus the one-hot target
            grad = grad.mul_(s[:, None])  # (K, V) d(mean loss)/d(capped logits)
            if slope is not None:
                grad = grad.mul_(slope)  # (K, V) d(mean loss)/d(logits)
            grad = grad.to(mm_dtype)
            if grad_hidden:  # fp8: e5m2 gradients against the e4m3 head
                d_hidden.append(fp8_matmul(grad, w_t, torch.float8_e5m2).to(mm_dtype) if fp8 else grad @ w)  # (K, C)
            if grad_weight and fp8:
                d_weight += fp8_matmul(grad.T, h.T, torch.float8_e5m2)  # (V, C), summed in fp32
            elif grad_weight and grad.dtype == dtype:
                d_weight.addmm_(grad.T, h)  # (V, C), in place: no temporary of the head's size
            elif grad_weight:
                d_weight += grad.T @ h  # (V, C) a 16-bit product, summed in fp32
    return total / count, torch.cat(d_hidden).to(hidden.dtype) if grad_hidden else None, d_weight


class LinearCrossEntropy(torch.autograd.Function):
    """`linear_cross_entropy` as an autograd function: the forward computes the gradients chunk by chunk and saves
    them, the backward scales them by the gradient of the loss."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                ignore_index: int, chunk: int, token_weights: torch.Tensor | None,
                softcap: float | None = None, fp8: bool = False) -> torch.Tensor:
        loss, d_hidden, d_weight = loss_and_grads(hidden, weight, targets, vocab_size, ignore_index, chunk,
                                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1], token_weights,
                                                  softcap, fp8)
        ctx.save_for_backward(d_hidden, d_weight.to(weight.dtype) if d_weight is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        return (None if d_hidden is None else d_hidden * grad_loss,
                None if d_weight is None else d_weight * grad_loss, None, None, None, None, None, None, None)
