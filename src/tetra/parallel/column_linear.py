"""A Linear from the column-split hidden state back to it (hidden -> hidden), for layers outside the attention /
MLP pattern: a recurrent-depth model's adapter, which merges the latent state with the injected input.

Each rank gathers the whole hidden state over the column group (its gradient is summed back and cut to this rank's
columns: a reduce-scatter) and computes its own output columns with the rows of W it holds, so no activation leaves
the column-split layout the blocks expect. W is replicated over row and depth like a norm weight.

Entry point: ColumnGatheredLinear(linear, grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tetra.parallel.collectives import Group, _size, all_gather_flat, reduce_scatter_flat
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout
from tetra.parallel.tensor_parallel import sharded_parameter


class _GatherColumns(torch.autograd.Function):
    """[..., h / P] on each of P ranks -> [..., h] everywhere; backward sums the gradient and keeps this rank's
    columns."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group, ctx.shape = group, local.shape
        parts = _size(group)
        gathered = all_gather_flat(local.contiguous().reshape(-1), group).view(parts, *local.shape)
        return gathered.movedim(0, -2).reshape(*local.shape[:-1], parts * local.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = _size(ctx.group)
        by_rank = grad.reshape(*ctx.shape[:-1], parts, ctx.shape[-1]).movedim(-2, 0).contiguous().reshape(-1)
        return reduce_scatter_flat(by_rank, ctx.group).view(ctx.shape), None


class ColumnGatheredLinear(nn.Module):
    """y[:, my columns] = x W[my columns, :]^T for a column-split x (no bias)."""

    def __init__(self, linear: nn.Linear, grid: ProcessGrid) -> None:
        super().__init__()
        self.group = grid.groups["col"]
        self.weight = sharded_parameter(linear.weight, Layout(tuple(linear.weight.shape), col_dim=0), grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = x if _size(self.group) == 1 else _GatherColumns.apply(x, self.group)
        return F.linear(whole, self.weight)
