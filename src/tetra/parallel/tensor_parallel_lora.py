"""A LoRA-adapted Linear on the 4D grid: the frozen base split like any TensorParallelLinear, and the low-rank
update y += scale * B A x split with it, so no activation is re-laid out and no rank holds a full adapter.

A [r, in] is split over the in-feature group like the base's in-features: each rank multiplies its input chunk and
the r-wide partial products are summed over that group. B [out, r] is split over the out-feature group like the
base's out-features. The rank dimension r is never split. Both factors are replicated over depth (they are tiny),
so their gradients are summed over data x depth like every replicated parameter (parallelize.gradient_group).

Duck-typed on the adapted module (lora_A, lora_B, rank, alpha, scale, lora_dropout): parallel/ does not import
adapters/, which sits beside it.

Entry points: TensorParallelLoRALinear, LoRAFactor (a factor's piece, a matrix for weight decay), is_lora_linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tetra.parallel.collectives import reduce_backward, reduce_forward
from tetra.parallel.gemm_layout import OUT_IN
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout
from tetra.parallel.overlap import CommSchedule
from tetra.parallel.tensor_parallel import TensorParallelLinear, sharded_parameter


def is_lora_linear(module: nn.Module) -> bool:
    """A Linear carrying a LoRA adapter (adapters.lora.LoRALinear, or its grid-split version)."""
    return isinstance(module, nn.Module) and hasattr(module, "lora_A") and hasattr(module, "lora_B")


class LoRAFactor(nn.Module):
    """Holds one adapter factor as `.weight`, so parameter names match the single-process LoRALinear's."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


class TensorParallelLoRALinear(TensorParallelLinear):
    """The frozen split base plus this rank's pieces of A (its in-feature columns) and B (its out-feature rows)."""

    def __init__(self, linear: nn.Module, grid: ProcessGrid, transposed: bool,
                 schedule: CommSchedule | None = None, gemm_layout: str = OUT_IN) -> None:
        super().__init__(linear, grid, transposed, schedule, gemm_layout)
        self.rank, self.alpha, self.scale = linear.rank, linear.alpha, linear.scale
        self.dropout = float(getattr(linear.lora_dropout, "p", 0.0))
        self.in_parts = grid.size("row" if transposed else "col")
        self.in_index = grid.index("row" if transposed else "col")
        a_shape, b_shape = tuple(linear.lora_A.weight.shape), tuple(linear.lora_B.weight.shape)
        # A [r, in]: in-features split like the base's; B [out, r]: out-features split like the base's.
        a_layout = Layout(a_shape, row_dim=1) if transposed else Layout(a_shape, col_dim=1)
        b_layout = Layout(b_shape, col_dim=0) if transposed else Layout(b_shape, row_dim=0)
        self.lora_A = LoRAFactor(sharded_parameter(linear.lora_A.weight, a_layout, grid))
        self.lora_B = LoRAFactor(sharded_parameter(linear.lora_B.weight, b_layout, grid))

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout with the mask one process would draw for the whole input, cut to this rank's in-features: the
        ranks sharing an input chunk (the out-feature group) draw the same mask and keep identical A copies."""
        if not self.training or self.dropout == 0.0:
            return x
        full = list(x.shape)
        full[-1] *= self.in_parts
        keep = torch.rand(full, device=x.device).chunk(self.in_parts, dim=-1)[self.in_index] >= self.dropout
        return x * keep.to(x.dtype) / (1.0 - self.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        partial = F.linear(self._dropped(x), self.lora_A.weight)  # [..., r], this chunk's share
        hidden = reduce_backward(reduce_forward(partial, self.in_group), self.out_group)
        return base + F.linear(hidden, self.lora_B.weight) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, in_parts={self.in_parts}"
