"""The global gradient norm of a model split or copied over a grid, and clipping to it.

A rank's gradients are pieces of the whole; a piece held identically by `copies` ranks must count once in the
global sum of squares, so each rank adds (its pieces' squared norm) / copies before the sum over the model group.
The per-piece norms use torch's fused multi-tensor kernels (as torch.nn.utils.clip_grad_norm_ does): an fp64 copy
of every gradient made the norm cost several times the optimizer step.

Entry points: local_square_sum(pieces), clip_to_norm(tensors, max_norm, norm).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def local_square_sum(pieces: Iterable[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Sum over (gradient, copies) of ||gradient||^2 / copies, as a float64 scalar on the CPU."""
    by_copies: dict[int, list[torch.Tensor]] = {}
    for gradient, copies in pieces:
        by_copies.setdefault(copies, []).append(gradient.detach())
    total = torch.zeros((), dtype=torch.float64)
    for copies, gradients in by_copies.items():
        wide = [g for g in gradients if g.dtype in (torch.float32, torch.float64)]
        # bf16 / fp16 gradients: each norm accumulated in fp32 (their own dtype would round and overflow early)
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in gradients if g.dtype not in
                 (torch.float32, torch.float64)]
        if wide:
            norms.append(torch.nn.utils.get_total_norm(wide))
        norm = torch.linalg.vector_norm(torch.stack([n.double().cpu() for n in norms]))
        total += norm * norm / copies
    return total


def clip_to_norm(tensors: Iterable[torch.Tensor], max_norm: float, norm: float) -> None:
    """Scale the tensors' gradients by max_norm / norm when the global norm exceeds max_norm (> 0)."""
    if max_norm > 0 and norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(list(tensors), max_norm, torch.tensor(norm))
