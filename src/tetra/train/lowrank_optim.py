"""Optimizers whose state is shaped by the gradient's singular vectors: GaLore (Zhao et al. 2024) keeps Adam's
moments of each weight matrix in a rank-r projection of the gradient, so their memory falls from 2 m n to 2 r max(m,
n) + the projector; Conda keeps full-rank moments but takes the second moment in the rotated basis of the first
moment's singular vectors. Parameters that are not 2-D matrices (norms, biases, embeddings) get plain AdamW.

GaLore, for a gradient G [m, n] (projected on its shorter side; P refreshed from G's SVD every `update_interval`
steps, the moments kept across refreshes as the paper does):
    R = P^T G (m < n) or G P (m >= n);  m, v: Adam moments of R;  update = scale * (P N or N P^T), N = m_hat /
    (sqrt(v_hat) + eps)
Conda: m = Adam's first moment of G; U = singular vectors of m on its shorter side, refreshed every
`update_interval` steps; v = beta2 v + (1 - beta2) (U^T G)^2; update = U ((U^T m_hat) / (sqrt(v_hat) + eps)).

Both decay the weight (decoupled, AdamW-style) and keep every tensor in `state`, so a checkpoint resumes exactly.

A parameter group with "project": True holds the matrices that get this treatment (build_optimizer puts the
blocks' attention and MLP weights there, as GaLore does); every other group, and any tensor that is not 2-D, gets
plain AdamW.

Entry points: GaLore(param_groups, ...), Conda(param_groups, ...).
"""

from __future__ import annotations

import torch


def _adam(parameter: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW step for a tensor without projection."""
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = 0
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(parameter), torch.zeros_like(parameter)
    state["step"] += 1
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = state["step"]
    denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
    parameter.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))


def _left_side(shape: torch.Size) -> bool:
    """Project (or rotate) the rows when there are fewer of them than columns."""
    return shape[0] < shape[1]


class _SingularOptimizer(torch.optim.Optimizer):
    """What GaLore and Conda share: AdamW for unprojected tensors, decoupled weight decay, the refresh clock."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 update_interval: int, **extra) -> None:
        if update_interval < 1:
            raise ValueError(f"update_interval must be at least 1 (got {update_interval})")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      update_interval=update_interval, **extra))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad.float()
                if group["weight_decay"]:
                    parameter.mul_(1 - group["lr"] * group["weight_decay"])
                state = self.state[parameter]
                if "step" in state:  # a checkpoint hands it back as a tensor; the bias corrections want a number
                    state["step"] = int(state["step"])
                if group.get("project") and parameter.dim() == 2:
                    self._matrix_step(parameter, grad, state, group)
                else:
                    _adam(parameter, grad, state, group)
        return loss

    def _matrix_step(self, parameter, grad, state, group) -> None:
        raise NotImplementedError


class GaLore(_SingularOptimizer):
    """Adam in a rank-`rank` projection of each matrix's gradient, refreshed every update_interval steps."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_interval: int = 200, scale: float = 0.25) -> None:
        if rank < 1:
            raise ValueError(f"GaLore's rank must be at least 1 (got {rank})")
        super().__init__(params, lr, betas, eps, weight_decay, update_interval, rank=rank, scale=scale)

    def _matrix_step(self, parameter, grad, state, group) -> None:
        left = _left_side(grad.shape)
        rank = min(group["rank"], *grad.shape)
        if not state or state["step"] % group["update_interval"] == 0:
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            state["projector"] = u[:, :rank].contiguous() if left else vh[:rank].T.contiguous()
        projector = state["projector"]
        reduced = projector.T @ grad if left else grad @ projector
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(reduced), torch.zeros_like(reduced)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(reduced, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(reduced, reduced, value=1 - beta2)
        step = state["step"]
        normalized = (state["exp_avg"] / (1 - beta1**step)) / ((state["exp_avg_sq"] / (1 - beta2**step)).sqrt()
                                                               + group["eps"])
        update = projector @ normalized if left else normalized @ projector.T
        parameter.add_(update.to(parameter.dtype), alpha=-group["lr"] * group["scale"])


class Conda(_SingularOptimizer):
    """Adam with the second moment taken in the rotated basis of the first moment's singular vectors."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, update_interval: int = 200) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, update_interval)

    def _matrix_step(self, parameter, grad, state, group) -> None:
        left = _left_side(grad.shape)
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        if state["step"] % group["update_interval"] == 0:
            u, _, vh = torch.linalg.svd(state["exp_avg"], full_matrices=False)
            state["basis"] = u.contiguous() if left else vh.T.contiguous()
        basis = state["basis"]
        rotated_grad = basis.T @ grad if left else grad @ basis
        rotated_avg = basis.T @ state["exp_avg"] if left else state["exp_avg"] @ basis
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(rotated_grad)
        state["step"] += 1
        state["exp_avg_sq"].mul_(beta2).addcmul_(rotated_grad, rotated_grad, value=1 - beta2)
        step = state["step"]
        normalized = (rotated_avg / (1 - beta1**step)) / ((state["exp_avg_sq"] / (1 - beta2**step)).sqrt()
                                                          + group["eps"])
        update = basis @ normalized if left else normalized @ basis.T
        parameter.add_(update.to(parameter.dtype), alpha=-group["lr"])
