"""Muon (momentum orthogonalised by Newton-Schulz; Jordan et al. 2024, as in modded-nanogpt) for the blocks'
matrices, and AdamW for every other parameter, as one optimizer with one state dict."""
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.optim.adamw import adamw

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
    Each iteration is three matrix products, the sums folded into them (addmm; baddbmm for a stack).
    """
    a, b, c = NS_COEFFICIENTS
    tall = G.size(-2) > G.size(-1)
    X = G.to(dtype or iteration_dtype(G.device))
    if tall:
        X = X.mT  # (..., r, n), r = min(rows, cols), n = max(rows, cols)
    shape = X.shape
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    if X.dim() > 2:
        X = X.reshape(-1, *shape[-2:])  # (matrices, r, n)
    multiply_add = torch.addmm if X.dim() == 2 else torch.baddbmm  # beta * input + alpha * (m1 @ m2)
    for _ in range(steps):
        A = X @ X.mT  # (..., r, r)
        B = multiply_add(A, A, A, beta=b, alpha=c)  # (..., r, r) b A + c A^2
        X = multiply_add(X, B, X, beta=a)  # (..., r, n) a X + B X
    X = X.reshape(shape)
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
    An AdamW group (lr, betas, eps, weight_decay) makes torch.optim.AdamW's update with its fused kernel.
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
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                for p in params:
                    muon_update(p, self.state[p], group)
            elif params:
                adamw_update(params, [self.state[p] for p in params], group)
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


def adamw_update(params: list[torch.Tensor], states: list[dict], group: dict) -> None:
    """One AdamW step of the group's params with gradients, through torch's fused kernel (torch.optim.AdamW's
    formula); each step count is a float32 tensor beside its parameter, read by the kernel without a host sync."""
    for p, state in zip(params, states):
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        elif not torch.is_tensor(state["step"]):  # a checkpoint written when the count was a Python int
            state["step"] = torch.tensor(float(state["step"]), device=p.device)
    (beta1, beta2) = group["betas"]
    adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
          [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
