"""Muon (momentum orthogonalised by Newton-Schulz; Jordan et al. 2024, as in modded-nanogpt) for the blocks'
matrices, and AdamW for every other parameter, as one optimizer with one state dict."""
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of the quintic iteration
NS_STEPS = 5


def iteration_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the Newton-Schulz iteration in training: bf16 on CUDA (the speedrun's), fp32 elsewhere, where
    bf16 matmuls have no fast kernel (7x slower than fp32 on a 2-core AMD EPYC for a 512 x 128 matrix)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """An approximation of U V^T for G = U S V^T (..., rows, cols), each matrix of a batch on its own, computed in
    `dtype` (default: `iteration_dtype` of G's device).

    G is divided by its Frobenius norm (every singular value then lies in [0, 1]) and taken through `steps`
    iterations of X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation (X X^T is the smaller square).
    The coefficients trade exactness for speed: the singular values come out between about 0.7 and 1.2, not 1.
    """
    a, b, c = NS_COEFFICIENTS
    tall = G.size(-2) > G.size(-1)
    X = G.to(dtype or iteration_dtype(G.device))
    if tall:
        X = X.mT  # (..., cols, rows)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT  # (..., r, r), r = min(rows, cols)
        X = a * X + (b * A + c * (A @ A)) @ X  # (..., r, max(rows, cols))
    return X.mT if tall else X  # (..., rows, cols)


def orthogonalized(update: torch.Tensor) -> torch.Tensor:
    """newton_schulz(update), also for an FSDP2 shard (a DTensor split on dim 0), returned with the same sharding.

    A stack of MoE experts (E, out, in) split on dim 0 holds whole experts on each rank: they are orthogonalised in
    place, with no communication. A matrix split by rows needs all of it: every rank gathers the full matrix,
    orthogonalises it and keeps its own rows (one all-gather of the matrix per step, and every rank computes every
    matrix's iteration).
    """
    if not isinstance(update, DTensor):
        return newton_schulz(update)
    if update.dim() > 2 and update.placements == (Shard(0),):
        local = newton_schulz(update.to_local())  # (local experts, out, in)
        return DTensor.from_local(local, update.device_mesh, update.placements, run_check=False,
                                  shape=update.shape, stride=update.stride())
    full = newton_schulz(update.full_tensor())  # (rows, cols)
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)  # this rank's rows


class Muon(torch.optim.Optimizer):
    """Muon on the param groups with use_muon=True, AdamW on the others.

    A Muon group (lr, momentum, nesterov, weight_decay) moves each matrix W (..., rows, cols), as the layer computes
    x @ W^T (nn.Linear's (out, in), an expert stack's (E, out, in)), with gradient G:

        M <- momentum M + (1 - momentum) G
        U <- (1 - momentum) G + momentum M    (Nesterov; without it U = M)
        W <- (1 - lr weight_decay) W - lr max(1, rows / cols)^0.5 newton_schulz(U)

    newton_schulz works on the last two dims, so each expert of a stack is orthogonalised on its own.
    An AdamW group (lr, betas, eps, weight_decay) makes torch.optim.AdamW's update.
    """

    def __init__(self, groups: list[dict]):
        super().__init__(groups, dict(weight_decay=0.0, nesterov=True))
        for group in self.param_groups:
            needed = ("lr", "momentum") if group["use_muon"] else ("lr", "betas", "eps")
            missing = [key for key in needed if key not in group]
            if missing:
                raise ValueError(f"a {'Muon' if group['use_muon'] else 'AdamW'} group needs {', '.join(missing)}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = muon_update if group["use_muon"] else adamw_update
            for p in group["params"]:
                if p.grad is not None:
                    update(p, self.state[p], group)
        return loss


def muon_update(p: torch.Tensor, state: dict, group: dict) -> None:
    """One Muon step of the matrix (or stack of matrices) p."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p.grad)
    momentum, buffer = group["momentum"], state["momentum_buffer"]
    buffer.lerp_(p.grad, 1 - momentum)
    update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(orthogonalized(update).to(p.dtype), alpha=-group["lr"] * scale)


def adamw_update(p: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW step of p (torch.optim.AdamW's formula); the step count is a Python int, read without a host sync."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    (beta1, beta2), lr, grad = group["betas"], group["lr"], p.grad
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** state["step"]
    bias_correction2 = 1 - beta2 ** state["step"]
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(group["eps"])
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
