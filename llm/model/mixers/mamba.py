"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces") as the mixer kind
`attn: mamba`, and its bidirectional form `attn: bimamba` (HELM's BiMamba) for masked-LM training.

One Mamba mixer: in_proj splits x (B, T, C) into u and a gate z, (B, T, d_inner) each; u goes through a causal
depthwise convolution and SiLU, then the selective scan, a diagonal linear recurrence per channel d and state n
whose time step, input and output weights depend on the token:

    delta_t = softplus(dt_proj(x_proj(u_t)) + dt_bias)        (d_inner,)
    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t           (d_inner, d_state), A = -exp(A_log)
    y_t = C_t . h_t + D * u_t                                  (d_inner,)

and the output is c_proj(y * silu(z)). The scan here is pure PyTorch (`selective_scan`, chunked: about 2 sqrt(T)
sequential steps, not T); on CUDA the `mamba-ssm` and `causal-conv1d` kernels run instead when importable
(pip install 'llm[mamba]'). Generation keeps a fixed-size recurrent state per layer (`MambaCache`).
"""
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BlockConfig, ConfigError, LLMconfig, require
from ..kinds import MixerKind


class Kernels(NamedTuple):
    """The fused CUDA kernels: causal_conv1d(x (B, D, T), weight (D, k), bias, activation) -> (B, D, T) and
    selective_scan(u, delta (B, D, T), A (D, N), B, C (B, N, T), D, z (B, D, T), delta_bias, delta_softplus) ->
    y * silu(z) (B, D, T)."""

    causal_conv1d: Callable
    selective_scan: Callable


def _load_kernels() -> Kernels | None:
    """mamba-ssm's selective scan and causal-conv1d's convolution when both import, else None. They are not
    traceable, so torch.compile runs them as they are."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return Kernels(torch.compiler.disable(causal_conv1d_fn), torch.compiler.disable(selective_scan_fn))


KERNELS = _load_kernels()
KERNEL_DEVICES = ("cuda",)  # device types the kernels run on


def use_kernels(kernels: Kernels | None, device_type: str, cached: bool, masked: bool) -> bool:
    """Whether a forward pass runs the fused kernels: they are installed, the tensors are on a device they run on,
    and the pass starts from an empty state without padding (training, evaluation; not generation)."""
    return kernels is not None and device_type in KERNEL_DEVICES and not cached and not masked


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs y_t = C_t . h_t (B, T, D) of h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t from h_0 = state
    (B, D, N) (zeros when None), and the last state h_T (B, D, N); u, delta (B, T, D), A (D, N), B, C (B, T, N).

    Chunked: the T steps are cut into K chunks of L ~ sqrt(T) steps (the end padded with steps that change nothing:
    delta 0). Each chunk's own contribution to its final state is a sum of decayed inputs (log-decays summed from
    the end of the chunk, so every exponent is <= 0); K sequential steps carry the state from chunk to chunk; then
    L sequential steps, all chunks at once, produce every output. A is constant in time, so the log-decays are
    summed as time steps (B, K, L, D) before they meet A. Memory O(B T D N).
    """
    batch, T, D = u.shape
    if T == 1 and state is not None:  # a generation step: the recurrence itself, without chunks
        h = torch.exp(delta[:, 0, :, None] * A) * state + (delta * u)[:, 0, :, None] * B[:, 0, None, :]  # (B, D, N)
        return torch.einsum("bdn,bn->bd", h, C[:, 0])[:, None], h  # (B, 1, D), (B, D, N)
    N = A.size(1)
    L = math.ceil(math.sqrt(T))
    K = math.ceil(T / L)
    pad = (0, 0, 0, K * L - T)  # steps after the end: delta 0 decays nothing and adds nothing
    u, delta, B, C = F.pad(u, pad), F.pad(delta, pad), F.pad(B, pad), F.pad(C, pad)
    delta = delta.view(batch, K, L, D)  # (B, K, L, D)
    summed = delta.cumsum(dim=2)  # (B, K, L, D) time from the chunk's start through step t
    inputs = (delta * u.view(batch, K, L, D))[..., None] * B.view(batch, K, L, 1, N)  # (B, K, L, D, N) delta_t B_t u_t
    to_end = (summed[:, :, -1:] - summed)[..., None] * A  # (B, K, L, D, N) log-decay after step t to the chunk's end
    own = (to_end.exp() * inputs).sum(dim=2)  # (B, K, D, N) each chunk's final state from a zero start
    through = (summed[:, :, -1, :, None] * A).exp()  # (B, K, D, N) decay across each whole chunk
    carry = u.new_zeros(batch, D, N) if state is None else state
    entering = []
    # unbind, not indexing, in the loops: its backward stacks the slices' gradients once, where each index's backward
    # would fill a zero tensor of the whole input
    for through_k, own_k in zip(through.unbind(1), own.unbind(1)):
        entering.append(carry)
        carry = through_k * carry + own_k  # (B, D, N)
    h = torch.stack(entering, dim=1)  # (B, K, D, N) the state before each chunk
    decay = (delta[..., None] * A).exp()  # (B, K, L, D, N) exp(delta_t A)
    outputs = []
    for decay_t, input_t, C_t in zip(decay.unbind(2), inputs.unbind(2), C.view(batch, K, L, N).unbind(2)):
        h = decay_t * h + input_t  # (B, K, D, N)
        outputs.append(torch.einsum("bkdn,bkn->bkd", h, C_t))  # (B, K, D)
    y = torch.stack(outputs, dim=2).reshape(batch, K * L, D)[:, :T]  # (B, T, D)
    return y, carry


def real_tokens(mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """(B, T, 1) True at the real tokens among the T new ones of a left-padded batch, or None without a mask.

    A row's newest token is real (rows are padded on the left only), so the last query's row of the padding mask
    (B, 1, T, S) marks which keys are real; the new tokens are the last T keys.
    """
    return None if mask is None else mask[:, 0, -1, -T:, None]


class MambaCache:
    """One Mamba layer's generation state for B rows: the last d_conv - 1 inputs of the convolution (B, d_inner,
    d_conv - 1) in the model's dtype and the SSM state (B, d_inner, d_state) in fp32. Its size does not depend on
    the number of tokens seen."""

    def __init__(self, batch: int, d_inner: int, d_conv: int, d_state: int, dtype: torch.dtype,
                 device: torch.device):
        self.conv = torch.zeros(batch, d_inner, d_conv - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, d_inner, d_state, dtype=torch.float32, device=device)

    def nbytes_per_token(self) -> int:
        """0: a token updates the state in place and adds nothing to it."""
        return 0

    def nbytes_held(self, tokens: int) -> int:
        """Bytes held per row, whatever the number of tokens: d_inner * ((d_conv - 1) * element size + 4 d_state)."""
        return sum(t[0].numel() * t.element_size() for t in (self.conv, self.ssm))


class TimeStepProjection(nn.Module):
    """dt_proj: the time step's rank-dt_rank projection, weight (d_inner, dt_rank) and bias (d_inner,), initialised
    as in the paper: softplus(bias) log-uniform in [dt_min, dt_max] (at least dt_init_floor), the weight uniform in
    +-dt_rank**-0.5 (random) or constant dt_rank**-0.5. Not an nn.Linear, so the model's generic initialisation of
    linear layers leaves it alone."""

    def __init__(self, rank: int, d_inner: int, block: BlockConfig):
        super().__init__()
        scale = rank ** -0.5
        self.weight = nn.Parameter(torch.full((d_inner, rank), scale) if block.dt_init == "constant"
                                   else torch.empty(d_inner, rank).uniform_(-scale, scale))
        low, high = math.log(block.dt_min), math.log(block.dt_max)
        dt = torch.exp(torch.rand(d_inner) * (high - low) + low).clamp(min=block.dt_init_floor)  # (d_inner,)
        self.bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt

    def forward(self, low_rank: torch.Tensor) -> torch.Tensor:
        """The raw time steps (B, T, d_inner) in fp32, before softplus, for low_rank (B, T, dt_rank)."""
        return F.linear(low_rank, self.weight).float() + self.bias.float()  # (B, T, d_inner)


def time_step_rank(block: BlockConfig, config: LLMconfig) -> int:
    """dt_rank, or ceil(n_embd / 16) when unset."""
    return block.dt_rank if block.dt_rank is not None else math.ceil(config.n_embd / 16)


class Mamba(nn.Module):
    """The Mamba mixer (module docstring): in_proj, causal depthwise conv1d + SiLU, x_proj to (dt, B, C), dt_proj,
    selective scan with A = -exp(A_log) and the skip D, gate silu(z), c_proj. Linear layers take their bias from
    --bias, the convolution from --conv_bias. Padding tokens of a left-padded batch leave the state unchanged
    (their convolution inputs and time steps are zeroed)."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        C, D, N = config.n_embd, block.expand * config.n_embd, block.d_state
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = D, N, block.d_conv, time_step_rank(block, config)
        self.in_proj = nn.Linear(C, 2 * D, bias=config.bias)
        self.conv1d = nn.Conv1d(D, D, block.d_conv, groups=D, bias=block.conv_bias)  # causal: padded on the left
        self.x_proj = nn.Linear(D, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = TimeStepProjection(self.dt_rank, D, block)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1))  # (D, N)
        self.D = nn.Parameter(torch.ones(D))
        for param in (self.A_log, self.D):
            param._no_weight_decay = True  # as the paper's recipe: AdamW leaves them undecayed
        self.c_proj = nn.Linear(D, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.causal = True  # set by the model from its objective; validation keeps mamba to causal ones

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> MambaCache:
        return MambaCache(batch, self.d_inner, self.d_conv, self.d_state, dtype, device)

    def convolve(self, u: torch.Tensor, cache: MambaCache | None, kernels: bool) -> torch.Tensor:
        """silu(causal depthwise conv1d(u)) (B, D, T) for u (B, D, T), continuing the cached inputs."""
        if kernels:
            return KERNELS.causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        past = u.new_zeros(u.size(0), self.d_inner, self.d_conv - 1) if cache is None else cache.conv.to(u.dtype)
        window = torch.cat((past, u), dim=-1)  # (B, D, d_conv - 1 + T)
        if cache is not None:
            cache.conv.copy_(window[:, :, window.size(-1) - (self.d_conv - 1):])
        return F.silu(self.conv1d(window))  # (B, D, T)

    def scan(self, u: torch.Tensor, z: torch.Tensor, real: torch.Tensor | None, cache: MambaCache | None,
             kernels: bool) -> torch.Tensor:
        """The gated scan output y * silu(z) (B, T, D) for the convolved u and the gate z (B, T, D)."""
        low_rank, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())  # (D, N)
        if kernels:
            y = KERNELS.selective_scan(u.transpose(1, 2), F.linear(low_rank, self.dt_proj.weight).transpose(1, 2),
                                       A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z.transpose(1, 2),
                                       self.dt_proj.bias.float(), True)  # (B, D, T)
            return y.transpose(1, 2)  # (B, T, D)
        delta = F.softplus(self.dt_proj(low_rank))  # (B, T, D) fp32
        if real is not None:
            delta = delta * real  # padding: no decay, no input
        y, state = selective_scan(u.float(), delta, A, B.float(), C.float(), None if cache is None else cache.ssm)
        if cache is not None:
            cache.ssm.copy_(state)
        return ((y + u.float() * self.D.float()) * F.silu(z.float())).to(u.dtype)  # (B, T, D)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: MambaCache | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with a cache, continues from its state and updates it (positions unused)."""
        kernels = use_kernels(KERNELS, x.device.type, cache is not None, mask is not None)
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, D) each
        real = real_tokens(mask, x.size(1))
        if real is not None:
            u = u * real  # padding tokens enter the convolution as zeros, like the zeros before a sequence
        u = self.convolve(u.transpose(1, 2), cache, kernels).transpose(1, 2)  # (B, T, D)
        y = self.scan(u, z, real, cache, kernels)  # (B, T, D)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class BiMamba(nn.Module):
    """HELM's bidirectional Mamba: one Mamba mixer reads the sequence left to right, another right to left; their
    outputs (B, T, C) each are concatenated and projected back, c_proj (2C -> C). Masked-LM objectives only."""

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.ahead = Mamba(block, config)
        self.behind = Mamba(block, config)
        self.c_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias)
        self.causal = False

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        raise ConfigError("attn=bimamba reads the whole sequence both ways; it has no generation cache")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C), every position seeing the whole sequence."""
        ahead = self.ahead(x, positions)  # (B, T, C) from the tokens up to t
        behind = self.behind(x.flip(1), positions).flip(1)  # (B, T, C) from the tokens from t on
        return self.c_proj(torch.cat((ahead, behind), dim=-1))  # (B, T, C)


def check_sizes(block: BlockConfig, config: LLMconfig) -> None:
    """The Mamba fields that both kinds read are in range; no mixture-of-depths routing."""
    for name in ("d_state", "expand", "d_conv"):
        value = getattr(block, name)
        require(value >= 1, f"{name}={value} must be >= 1")
    require(block.dt_rank is None or block.dt_rank >= 1,
            f"dt_rank={block.dt_rank} must be >= 1, or unset for ceil(n_embd / 16)")
    require(0 < block.dt_min <= block.dt_max, f"dt_min={block.dt_min} and dt_max={block.dt_max} must satisfy "
                                              "0 < dt_min <= dt_max")
    require(block.dt_init_floor >= 0, f"dt_init_floor={block.dt_init_floor} must be >= 0")
    require(not block.mod, f"mod=true with attn={block.attn}: mixture-of-depths routing of a recurrent scan is not "
                           "supported; drop --mod")


def mixing_flops(block: BlockConfig, config: LLMconfig) -> float:
    """The selective scan's 9 FLOPs per inner channel and state per token forward (discretising, the recurrence and
    the output contraction, as mamba-ssm counts them), three times that with the backward."""
    return 3 * 9 * block.expand * config.n_embd * block.d_state


def bidirectional_mixing_flops(block: BlockConfig, config: LLMconfig) -> float:
    """Two scans, one each way."""
    return 2 * mixing_flops(block, config)


MAMBA = MixerKind("mamba", Mamba, check_sizes, direction="causal", counterpart="bimamba", mixing_flops=mixing_flops,
                  examples={"mamba": dict(attn="mamba", d_state=4, expand=2, d_conv=3),
                            "mamba_rank2": dict(attn="mamba", d_state=3, expand=1, d_conv=4, dt_rank=2,
                                                conv_bias=False)})
# The bimamba example's convolution spans the generic tests' sequences, so that each position's dependence on every
# later token shows through the backward branch at initialisation, where the scan's share is still tiny.
BIMAMBA = MixerKind("bimamba", BiMamba, check_sizes, direction="bidirectional", counterpart="mamba",
                    mixing_flops=bidirectional_mixing_flops,
                    examples={"bimamba": dict(attn="bimamba", d_state=4, expand=2, d_conv=8)})
