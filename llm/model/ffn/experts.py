"""Routed experts run as grouped matmuls over tokens sorted by expert (dropless: no capacity, no dropped tokens)."""
import torch
import torch.nn.functional as F
from torch import nn

from ...config import BlockConfig, LLMconfig
from .activations import activation

GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the CPU kernel takes in eager mode
GROUPED_MM = getattr(F, "grouped_mm", None)  # public in recent torch; older builds use the padded fallback


def rows_aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x (M, K) @ weight (E, K, N) has 16-byte aligned rows (K and N), as torch's grouped matmul requires."""
    multiple = 16 // x.element_size()
    return x.shape[-1] % multiple == 0 and weight.shape[-1] % multiple == 0


def grouped_mm_compiles(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul runs here inside torch.compile: bf16 on CPU or on CUDA (SM >= 80)."""
    if GROUPED_MM is None or x.dtype != torch.bfloat16 or not rows_aligned(x, weight):
        return False
    return x.device.type == "cpu" or (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (8, 0))


def kernel_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul kernel runs x (M, K) @ weight (E, K, N) in eager mode: CPU, float dtypes."""
    return GROUPED_MM is not None and x.device.type == "cpu" and x.dtype in GROUPED_MM_DTYPES and rows_aligned(x, weight)


def group_positions(offsets: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For M rows sorted by group (group g ends at offsets[g]): each row's group (M,), its position within the group
    (M,), and the largest group size. Reading that size is the padded fallback's host sync."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()  # (E,)
    group = torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts, output_size=M)  # (M,)
    row = torch.arange(M, device=offsets.device) - (offsets.long() - counts)[group]  # (M,)
    return group, row, int(counts.max())


def padded_groups(rows: torch.Tensor, group: torch.Tensor, row: torch.Tensor, n_groups: int, size: int) -> torch.Tensor:
    """Rows (M, D) scattered into an (n_groups, size, D) buffer, zeros elsewhere."""
    padded = rows.new_zeros(n_groups, size, rows.shape[-1])  # (E, size, D)
    padded[group, row] = rows
    return padded


def padded_bmm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The batched fallback of x (M, K) @ weight (E, K, N): rows are scattered into an (E, max group size, K) buffer,
    multiplied with one bmm and gathered back (M, N)."""
    group, row, size = group_positions(offsets, x.shape[0])
    return torch.bmm(padded_groups(x, group, row, len(offsets), size), weight)[group, row]  # (M, N)


def padded_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The batched fallback of each group's x_g^T @ grad_g for x (M, K) and grad (M, N): (E, K, N)."""
    group, row, size = group_positions(offsets, x.shape[0])
    padded_x = padded_groups(x, group, row, len(offsets), size)  # (E, size, K)
    return torch.bmm(padded_x.transpose(1, 2), padded_groups(grad, group, row, len(offsets), size))  # (E, K, N)


@torch.library.custom_op("llm::grouped_mm", mutates_args=())
def opaque_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (E, K, N) by group, as one operator that torch.compile does not look into (its meta kernel
    accepts bf16 only): torch's kernel where it runs (CPU), the padded fallback elsewhere. Returns (M, N)."""
    if kernel_usable(x, weight):
        return GROUPED_MM(x, weight, offs=offsets)
    return padded_bmm(x, weight, offsets)


@opaque_grouped_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[-1])  # (M, N)


@torch.library.custom_op("llm::grouped_mm_weight_grad", mutates_args=())
def opaque_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradient of opaque_grouped_mm, each group's x_g^T @ grad_g for x (M, K), grad (M, N): (E, K, N)."""
    if kernel_usable(x, grad):
        return GROUPED_MM(x.t(), grad, offs=offsets)
    return padded_weight_grad(x, grad, offsets)


@opaque_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])  # (E, K, N)


def _save_inputs(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # (M, N) with the row strides the kernel takes
    grad_x = opaque_grouped_mm(grad, weight.transpose(1, 2), offsets)  # (M, K)
    return grad_x, opaque_weight_grad(x, grad, offsets), None  # (M, K), (E, K, N)


opaque_grouped_mm.register_autograd(_backward, setup_context=_save_inputs)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, K), sorted by group, times their group's weight (E, K, N); group g ends at offsets[g].

    torch's grouped matmul goes into the compiled graph where it compiles (bf16 on CPU and CUDA SM >= 80); other
    cases run as the opaque operator, so a model compiles whole (fullgraph) with either.
    """
    if grouped_mm_compiles(x, weight):
        return GROUPED_MM(x, weight, offs=offsets)  # (M, N)
    return opaque_grouped_mm(x, weight, offsets)  # (M, N)


class ExpertLinear(nn.Module):
    """E linear maps stored as one (E, out, in) weight (and an (E, out) bias), applied to tokens grouped by expert."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(n_experts, out_features)) if bias else None

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """x (M, in) sorted by expert, offsets (E,) where each expert's rows end, expert (M,) each row's expert."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        y = grouped_mm(x.to(dtype), self.weight.to(dtype).transpose(1, 2), offsets)  # (M, out)
        return y if self.bias is None else y + self.bias[expert].to(dtype)


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer, each an MLP with the layer's up_dim and activation.

    Every (token, chosen expert) pair becomes one row; rows are sorted by expert so that each expert's
    rows are contiguous, both projections run as grouped matmuls, and the gate-weighted results are
    added back to their tokens.
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.n_experts = block.n_exp - block.n_shared
        self.act, self.gated = activation(block.non_linearity)
        self.c_fc = ExpertLinear(self.n_experts, config.n_embd, (2 if self.gated else 1) * block.up_dim, config.bias)
        self.c_proj = ExpertLinear(self.n_experts, block.up_dim, config.n_embd, config.bias)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        """Tokens x (N, C), chosen experts indices (N, k) and gate weights (N, k) -> (output (N, C), load (E,)).

        load counts the tokens each expert received.
        """
        N, k = indices.shape
        flat = indices.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)  # (N*k,) rows sorted by expert
        expert = flat[order]  # (N*k,)
        load = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        load.scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
        offsets = load.cumsum(0).to(torch.int32)  # (E,)
        token = order // k  # (N*k,)
        h = self.c_fc(x[token], offsets, expert)  # (N*k, up_dim or 2 * up_dim)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up  # (N*k, up_dim)
        else:
            h = self.act(h)
        out = self.c_proj(h, offsets, expert) * weights.reshape(-1, 1)[order]  # (N*k, C)
        y = torch.zeros(N, x.shape[-1], dtype=out.dtype, device=x.device).index_add_(0, token, out)  # (N, C)
        return y, load
