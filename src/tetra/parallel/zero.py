"""ZeRO-1 over the data dimension: each data rank keeps optimizer state for a 1/data slice of every parameter.

Gradients are reduce-scattered over data (instead of all-reduced), the optimizer updates its slices, and the
updated slices are all-gathered back into the parameters. Entry point: ZeroOptimizer(groups, grid, make_optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tetra.parallel.collectives import all_gather_flat, all_reduce, reduce_scatter_flat
from tetra.parallel.gradient_norm import clip_to_norm, local_square_sum
from tetra.parallel.grid import ProcessGrid


class ZeroOptimizer:
    """Wraps an optimizer built over flat parameter slices; presents param_groups for the schedule."""

    def __init__(self, groups: list[dict], grid: ProcessGrid,
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]) -> None:
        self.grid = grid
        self.group = grid.groups["data"]
        size, index = grid.size("data"), grid.index("data")
        self.slices: dict[nn.Parameter, nn.Parameter] = {}
        slice_groups = []
        for group in groups:
            slices = []
            for parameter in group["params"]:
                chunk = math.ceil(parameter.numel() / size)
                flat = F.pad(parameter.detach().reshape(-1), (0, chunk * size - parameter.numel()))
                piece = nn.Parameter(flat[index * chunk:(index + 1) * chunk].clone())
                self.slices[parameter] = piece
                slices.append(piece)
            slice_groups.append({**group, "params": slices})
        self.inner = make_optimizer(slice_groups)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def reduce_and_clip(self, max_norm: float) -> float:
        """Sum each gradient over data into this rank's slice, then clip all slices to the global norm."""
        pieces = []
        for parameter, piece in self.slices.items():
            grad = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
            padded = F.pad(grad.reshape(-1), (0, piece.numel() * self.grid.size("data") - parameter.numel()))
            piece.grad = reduce_scatter_flat(padded, self.group)
            layout = getattr(parameter, "tetra_layout", None)
            pieces.append((piece.grad, layout.copies(self.grid) if layout is not None else self.grid.size("model")))
            parameter.grad = None  # the slice holds it now
        total = all_reduce(all_reduce(local_square_sum(pieces), self.grid.groups["model"]), self.group)
        norm = math.sqrt(float(total))
        clip_to_norm(self.slices.values(), max_norm, norm)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """Update the slices, then re-assemble every parameter from all data ranks' slices."""
        self.inner.step()
        for parameter, piece in self.slices.items():
            full = all_gather_flat(piece.detach(), self.group)[: parameter.numel()]
            parameter.copy_(full.view_as(parameter))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for parameter in self.slices:
            parameter.grad = None

    def gathered_state(self, parameter: nn.Parameter) -> dict[str, torch.Tensor]:
        """Collective: this parameter's optimizer state at the parameter's own shape (for checkpoints)."""
        state = {}
        for key, value in self.inner.state.get(self.slices[parameter], {}).items():
            if value.dim() == 0:
                state[key] = value
            else:
                state[key] = all_gather_flat(value, self.group)[: parameter.numel()].view_as(parameter)
        return state

    def set_state(self, parameter: nn.Parameter, key: str, value: torch.Tensor) -> None:
        """Install state given at the parameter's shape (from a checkpoint): keep this rank's slice."""
        piece = self.slices[parameter]
        if value.dim() > 0:
            size, index = self.grid.size("data"), self.grid.index("data")
            flat = F.pad(value.reshape(-1), (0, piece.numel() * size - value.numel()))
            value = flat[index * piece.numel():(index + 1) * piece.numel()].clone()
        self.inner.state[piece][key] = value.to(piece.device)


def optimizer_state_of(optimizer, parameter: nn.Parameter) -> dict[str, torch.Tensor]:
    """A parameter's optimizer state at the parameter's shape, for either kind of optimizer (collective for ZeRO)."""
    if isinstance(optimizer, ZeroOptimizer):
        return optimizer.gathered_state(parameter)
    return optimizer.state.get(parameter, {})


def set_optimizer_state(optimizer, parameter: nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Install one state tensor given at the parameter's shape."""
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.set_state(parameter, key, value)
    else:
        optimizer.state[parameter][key] = value.to(parameter.device)
