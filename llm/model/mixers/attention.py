"""What the attention kinds share: the attention kernel (causal, or bidirectional for masked-LM objectives, either
optionally within a sliding window), the layer's sliding window and the checks of the head count and window.

The kernel is chosen per call by `select_backend`, a pure function of the requested `--attn_backend`, the call
(device, dtype, head sizes, padding mask, dropout) and the machine (flash-attn installed, GPU compute capability,
cuDNN version): PyTorch SDPA, SDPA restricted to (or preferring) cuDNN attention, FlashAttention (flash-attn-4,
or flash-attn 2) or FlexAttention.
"""
from functools import cache, lru_cache
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ...config import BlockConfig, ConfigError, LLMconfig, require
from ..windows import in_window

HALF = (torch.float16, torch.bfloat16)
# cuDNN before 9.15.1 mishandles sequence lengths that are not multiples of 128; PyTorch prefers cuDNN from there on.
CUDNN_AUTO_MIN_VERSION = 91501
FLASH_MIN_CAPABILITY = {4: (9, 0), 2: (8, 0)}  # flash-attn-4 targets Hopper and Blackwell, flash-attn 2 Ampere on
SDPA_CUDNN_ONLY = [SDPBackend.CUDNN_ATTENTION]
SDPA_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


def _load_flash() -> dict:
    """The importable FlashAttention kernels by major version, each called as f(q, k, v, dropout_p, scale, causal) on
    (B, T, H, D) tensors, a causal mask aligned to the bottom right; flash-attn 2 also as f(..., causal, window) with
    a sliding window of `window` tokens (an int)."""
    kernels = {}
    try:
        from flash_attn.cute import flash_attn_func as fa4  # flash-attn-4: no dropout, returns (out, lse)

        # Its CuTe kernels are not traceable, so torch.compile runs them as they are.
        kernels[4] = torch.compiler.disable(
            lambda q, k, v, dropout_p, scale, causal: fa4(q, k, v, softmax_scale=scale, causal=causal)[0])
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func as fa2

        def fa2_window(window: int | None, causal: bool) -> tuple[int, int]:
            """flash-attn 2's window_size (keys left, keys right of the query; -1: unbounded)."""
            return (-1, -1) if window is None else (window - 1, 0 if causal else window - 1)

        kernels[2] = lambda q, k, v, dropout_p, scale, causal, window=None: fa2(
            q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=fa2_window(window, causal))
    except ImportError:
        pass
    return kernels


FLASH = _load_flash()
CUDNN_VERSION = torch.backends.cudnn.version() or 0


class AttentionCall(NamedTuple):
    """What the kernel choice depends on in one call."""

    device: str  # device type: cuda, cpu, ...
    dtype: torch.dtype
    qk_head_size: int
    v_head_size: int  # differs from qk_head_size in MLA with RoPE (and in its cached, absorbed form)
    masked: bool  # a padding mask (left-padded batches in generation)
    dropout_p: float
    needs_grad: bool = False  # the inputs require gradients (training)
    window: Literal["none", "fixed", "scheduled", "blocks"] = "none"  # a sliding window as an int, as a tensor
    # (schedule), or counted in blocks of tokens (--window_unit)


class Machine(NamedTuple):
    """What the machine offers."""

    flash: frozenset[int] = frozenset()  # importable flash-attn major versions (4, 2)
    capability: tuple[int, int] | None = None  # the GPU's compute capability; None without one
    cudnn_version: int = 0  # as torch.backends.cudnn.version(), 0 without cuDNN


def why_not_flash(call: AttentionCall, machine: Machine, version: int) -> str | None:
    """Why flash-attn `version` cannot run the call, or None when it can."""
    qk, v = call.qk_head_size, call.v_head_size
    if version not in machine.flash:
        return "flash-attn is not installed (pip install 'llm[flash]')"
    if call.device != "cuda" or machine.capability is None:
        return "it runs on CUDA GPUs only"
    if machine.capability < FLASH_MIN_CAPABILITY[version]:
        major, minor = FLASH_MIN_CAPABILITY[version]
        return f"flash-attn{'-4' if version == 4 else ' 2'} needs compute capability {major}.{minor} or newer"
    if call.dtype not in HALF:
        return f"it needs fp16 or bf16 inputs, got {call.dtype}"
    if qk != v:
        return f"it needs equal query/key and value head sizes, got {qk} and {v} (MLA with RoPE)"
    if qk % 8 or qk > 256:
        return f"it needs a head size that is a multiple of 8 up to 256, got {qk}"
    if call.masked:
        return "it takes no padding mask (left-padded batches in generation)"
    if version == 4 and call.dropout_p > 0:
        return "flash-attn-4 has no attention dropout (set --dropout 0)"
    if version == 4 and call.window != "none":
        return "flash-attn-4 runs no sliding window here (--window)"
    if call.window == "scheduled":
        return "a scheduled window (--window_schedule) is a tensor, and flash-attn 2 takes a fixed one"
    if call.window == "blocks":
        return "flash-attn 2 counts windows in tokens, not in blocks (--window_unit)"
    return None


def why_not_cudnn(call: AttentionCall, machine: Machine) -> str | None:
    """Why PyTorch's cuDNN attention cannot run the call, or None when it can (as far as the call tells)."""
    qk, v = call.qk_head_size, call.v_head_size
    if call.device != "cuda" or machine.capability is None:
        return "it runs on CUDA GPUs only"
    if machine.capability < (8, 0):
        return "it needs compute capability 8.0 or newer"
    if machine.cudnn_version == 0:
        return "this PyTorch has no cuDNN"
    if call.dtype not in HALF:
        return f"it needs fp16 or bf16 inputs, got {call.dtype}"
    if qk % 8 or v % 8 or max(qk, v) > 128:
        return f"it needs head sizes that are multiples of 8 up to 128, got {qk} and {v}"
    if call.dropout_p * 16 != int(call.dropout_p * 16):
        return f"its dropout must be a multiple of 1/16, got {call.dropout_p}"
    return None


def why_not_flex(call: AttentionCall, machine: Machine) -> str | None:
    """Why FlexAttention cannot run the call, or None when it can."""
    if call.device not in ("cuda", "cpu"):
        return f"it runs on CUDA and CPU, not {call.device}"
    if call.dropout_p > 0:
        return "FlexAttention has no attention dropout (set --dropout 0)"
    if call.device == "cpu" and call.needs_grad:
        return "FlexAttention has no backward pass on CPU (it runs there for generation and evaluation only)"
    return None


def usable_flash(call: AttentionCall, machine: Machine) -> str | None:
    """'flash4' or 'flash2', the first flash-attn that can run the call, or None."""
    return next((f"flash{version}" for version in (4, 2) if why_not_flash(call, machine, version) is None), None)


def auto_backend(call: AttentionCall, machine: Machine) -> str:
    """The fastest kernel for the call: on CUDA with 16-bit inputs flash-attn-4, else cuDNN attention on Hopper and
    newer (with cuDNN >= 9.15.1), else flash-attn 2, else SDPA; SDPA everywhere else. A sliding window on CUDA runs
    on flash-attn 2 (a fixed window, 16-bit inputs), else FlexAttention, whose block mask skips the blocks outside
    the window; elsewhere on SDPA with an explicit mask."""
    if call.window != "none" and call.device == "cuda":
        return usable_flash(call, machine) or ("flex" if why_not_flex(call, machine) is None else "sdpa")
    if call.device != "cuda" or call.dtype not in HALF:
        return "sdpa"
    if why_not_flash(call, machine, 4) is None:
        return "flash4"
    if ((machine.capability or (0, 0)) >= (9, 0) and machine.cudnn_version >= CUDNN_AUTO_MIN_VERSION
            and why_not_cudnn(call, machine) is None):
        return "cudnn"
    return usable_flash(call, machine) or "sdpa"


def select_backend(requested: str, call: AttentionCall, machine: Machine) -> str:
    """The kernel that runs the call: 'sdpa', 'cudnn', 'flash4', 'flash2' or 'flex'.

    `auto` picks with `auto_backend`; a requested backend that cannot run the call is a one-line ConfigError naming
    it and why.
    """
    if requested == "auto":
        return auto_backend(call, machine)
    if requested == "flash":
        chosen = usable_flash(call, machine)
        reason = None if chosen else why_not_flash(call, machine, 4 if 4 in machine.flash else 2)
    else:
        why_not = {"cudnn": why_not_cudnn, "flex": why_not_flex}.get(requested)  # sdpa runs everything
        chosen, reason = requested, why_not and why_not(call, machine)
    if reason:
        raise ConfigError(f"attn_backend={requested} cannot run here: {reason}; use --attn_backend auto")
    return chosen


def machine_of(device: torch.device) -> Machine:
    """What the machine offers for tensors on `device` (constant-folded under torch.compile)."""
    if device.type != "cuda":
        return Machine(frozenset(FLASH))
    props = torch.cuda.get_device_properties(device)
    return Machine(frozenset(FLASH), (props.major, props.minor), CUDNN_VERSION)


@cache
def compiled_flex(device_type: str):
    """FlexAttention compiled (its eager form materialises the whole score matrix). On CPU one kernel per shape:
    inductor's CPU code for dynamic shapes does not build in torch 2.13."""
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def causal_block_mask(T: int, S: int, device: torch.device):
    """The block mask of causal attention of the last T of S positions (query t sees keys up to S - T + t)."""
    offset = S - T
    return create_block_mask(lambda b, h, q, kv: q + offset >= kv, None, None, T, S, device=device)


cached_causal_block_mask = lru_cache(maxsize=8)(causal_block_mask)  # eager calls reuse it; compiled code builds it


def window_rule(offset: int, window: int | torch.Tensor, causal: bool, unit: int = 1):
    """The mask_mod of a sliding window over the last T of S positions (offset = S - T): query q, at index
    q + offset, sees key kv when in_window(q + offset, kv, window, causal, unit)."""
    def rule(b, h, q, kv):
        return in_window(q + offset, kv, window, causal, unit)
    return rule


def window_block_mask(T: int, S: int, window: int | torch.Tensor, causal: bool, device: torch.device,
                      unit: int = 1):
    """The block mask of a sliding window (see window_rule); a tensor window is read when the mask is built."""
    return create_block_mask(window_rule(S - T, window, causal, unit), None, None, T, S, device=device)


cached_window_block_mask = lru_cache(maxsize=8)(window_block_mask)  # for int windows in eager calls


def flex_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float | None, causal: bool = True, window: int | torch.Tensor | None = None,
                          window_unit: int = 1) -> torch.Tensor:
    """FlexAttention on (B, H|KV, T|S, D) tensors with the causal mask, the padding mask (B, 1, T, S), or none
    (bidirectional), each restricted to a sliding window of `window` tokens (in units of window_unit) when given."""
    B, T, S = q.size(0), q.size(2), k.size(2)
    compiling = torch.compiler.is_compiling()  # inside an outer torch.compile, which compiles FlexAttention too
    if mask is not None:
        near = window_rule(S - T, window, causal, window_unit) if window is not None else lambda b, h, qi, kv: True
        block_mask = create_block_mask(lambda b, h, qi, kv: mask[b, 0, qi, kv] & near(b, h, qi, kv), B, None, T, S,
                                       device=q.device)
    elif window is not None:
        reuse = isinstance(window, int) and not compiling
        block_mask = (cached_window_block_mask if reuse else window_block_mask)(T, S, window, causal, q.device,
                                                                                window_unit)
    elif not causal:
        block_mask = None
    else:
        block_mask = (causal_block_mask if compiling else cached_causal_block_mask)(T, S, q.device)
    if compiling and q.device.type == "cpu":  # torch 2.13's CPU kernel misreads inputs it fuses (RoPE) otherwise
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    flex = flex_attention if compiling else compiled_flex(q.device.type)
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.size(1) != q.size(1))


def window_band(T: int, S: int, window: int | torch.Tensor, causal: bool, device: torch.device,
                unit: int = 1) -> torch.Tensor:
    """(T, S) True where query t of the last T of S positions (index S - T + t) sees key s within a sliding window
    (`in_window`)."""
    return in_window(torch.arange(S - T, S, device=device)[:, None], torch.arange(S, device=device)[None], window,
                     causal, unit)  # (T, S)


def window_kind(window: int | torch.Tensor | None,
                unit: int = 1) -> Literal["none", "fixed", "scheduled", "blocks"]:
    """How a call's sliding window is given: none, a Python int (fixed), a tensor (a training schedule), or either
    counted in blocks of unit > 1 tokens."""
    if window is None:
        return "none"
    return "blocks" if unit > 1 else "fixed" if isinstance(window, int) else "scheduled"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, dropout_p: float,
                     mask: torch.Tensor | None = None, scale: float | None = None, causal: bool = True,
                     window: int | torch.Tensor | None = None, window_unit: int = 1) -> torch.Tensor:
    """Causal attention of queries q (B, T, H, D) over keys k (B, S, KV, D) and values v (B, S, KV, Dv), KV dividing H.

    The T queries are the last T of the S positions (S > T when earlier keys come from a cache), so query t
    sees keys up to S - T + t: the causal mask is aligned to the bottom right. `mask` (B, 1, T, S), True where
    attention is allowed, replaces that rule (left-padded batches). With causal=False and no mask every query sees
    every key (masked-LM objectives). `window` (an int, or a () tensor that a training schedule changes without
    recompiling) further restricts query t to the keys at distance d = S - T + t - s with 0 <= d < window, or
    |d| < window when not causal; with window_unit u > 1 it counts whole blocks of u tokens (`in_window`). The
    softmax scale defaults to 1/sqrt(D). `backend` is the requested --attn_backend; `select_backend` picks the
    kernel. Returns (B, T, H, Dv).
    """
    call = AttentionCall(q.device.type, q.dtype, q.size(-1), v.size(-1), mask is not None, dropout_p,
                         q.requires_grad or k.requires_grad or v.requires_grad, window_kind(window, window_unit))
    kernel = select_backend(backend, call, machine_of(q.device))
    if kernel in ("flash4", "flash2"):  # flash-attn takes (B, T, H, D) and aligns its causal mask to the bottom right
        flash = FLASH[int(kernel[-1])]
        if window is None:
            return flash(q, k, v, dropout_p, scale, causal)  # (B, T, H, Dv)
        return flash(q, k, v, dropout_p, scale, causal, window)  # (B, T, H, Dv)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T|S, D)
    if kernel == "flex":
        y = flex_causal_attention(q, k, v, mask, scale, causal, window, window_unit)  # (B, H, T, Dv)
        return y.transpose(1, 2)  # (B, T, H, Dv)
    T, S = q.size(2), k.size(2)
    if window is not None:
        band = window_band(T, S, window, causal, q.device, window_unit)  # (T, S)
        mask = band if mask is None else mask & band  # (T, S) or (B, 1, T, S)
    elif mask is None and causal and 1 < T < S:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # (T, S)
    sdpa = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None and T == S, scale=scale,
                enable_gqa=k.size(1) != q.size(1))
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, **sdpa).transpose(1, 2)  # (B, T, H, Dv)
    # cuDNN: only cuDNN when requested, else cuDNN first with PyTorch's other kernels behind it
    with sdpa_kernel(SDPA_CUDNN_ONLY if backend == "cudnn" else SDPA_CUDNN_FIRST, set_priority=True):
        try:
            y = F.scaled_dot_product_attention(q, k, v, **sdpa)  # (B, H, T, Dv)
        except RuntimeError as e:  # PyTorch's words for no kernel left: on CUDA, and on CPU
            if "No available kernel" not in str(e) and "No viable backend" not in str(e):
                raise
            raise ConfigError("attn_backend=cudnn cannot run here: PyTorch's cuDNN attention refused these inputs "
                              "(its warnings above say why); use --attn_backend auto") from None
    return y.transpose(1, 2)  # (B, T, H, Dv)


class SlidingWindow(nn.Module):
    """A layer's sliding window: `size` tokens (None: full attention) counted in units of `unit` tokens, and below
    it the window that a training schedule (--window_schedule) sets, held in a () tensor so that compiled code reads
    it and does not change with it. The tensor is a non-persistent buffer: checkpoints do not carry it, the schedule
    sets it from the step."""

    def __init__(self, size: int | None, unit: int = 1):
        super().__init__()
        self.size, self.unit = size, unit
        self.scheduled = False  # whether the limit applies (set once, before the first compiled step)
        self.register_buffer("limit", torch.tensor(size or 0), persistent=False)

    def schedule(self, limit: int, final: int | None = None) -> None:
        """Attends over min(size, limit) tokens from now on (training and evaluation), or, given the limit's `final`
        value, over the window's share size * limit / final, rounded down to whole units and at least one (the size
        once the limit reaches final); nothing for a full layer."""
        if self.size is not None:
            if final is None:
                self.limit.fill_(min(self.size, limit))
            else:
                self.limit.fill_(self.unit * max(1, self.size * limit // (self.unit * final)))
            self.scheduled = True

    def current(self) -> int | torch.Tensor | None:
        """The window the kernel gets: None (full attention), the size, or the scheduled limit (a () tensor)."""
        if self.size is None:
            return None
        return self.limit if self.scheduled else self.size


def schedule_windows(model: nn.Module, limit: int | None, final: int | None = None) -> None:
    """Limits every sliding window of the model to `limit` tokens (None: leaves them as they are), or to its share of
    the limit when the limit's final value is given (SlidingWindow.schedule)."""
    if limit is not None:
        for module in model.modules():
            if isinstance(module, SlidingWindow):
                module.schedule(limit, final)


def check_window(block: BlockConfig) -> None:
    """A sliding window, when set, holds at least the query itself."""
    require(block.window is None or block.window >= 1,
            f"window={block.window} must be >= 1 (tokens a query attends to, itself included); leave it unset for "
            "full attention")


def check_heads(block: BlockConfig, config: LLMconfig, own_head_dim: bool = False) -> None:
    """n_head must be positive and divide n_embd (head size = n_embd // n_head), unless the kind reads head_dim
    (`own_head_dim`) and it is set (>= 1)."""
    require(block.n_head >= 1, f"n_head={block.n_head} must be >= 1")
    if own_head_dim and block.head_dim is not None:
        require(block.head_dim >= 1, f"head_dim={block.head_dim} must be >= 1 (or unset: n_embd // n_head)")
        return
    require(config.n_embd % block.n_head == 0,
            f"n_head={block.n_head} does not divide n_embd={config.n_embd}; choose n_head dividing n_embd")
