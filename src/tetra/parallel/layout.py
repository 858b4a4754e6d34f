"""Where each piece of a full tensor lives in the grid, and the two directions: shard a full tensor, gather it back.

Entry points: Layout, shard(full, layout, grid), unshard(local, layout, grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tetra.parallel.collectives import all_gather_flat
from tetra.parallel.grid import ProcessGrid


@dataclass(frozen=True)
class Layout:
    """A full tensor split along `row_dim` over the row group and `col_dim` over the column group (None: not split
    that way); a `transposed` 2-D block is stored the other way round (a weight kept [in, out] for its faster
    GEMMs); with `depth`, the stored block is flattened and split evenly (zero-padded) over the depth group."""

    full_shape: tuple[int, ...]
    row_dim: int | None = None
    col_dim: int | None = None
    depth: bool = False
    transposed: bool = False

    def block_shape(self, grid: ProcessGrid) -> tuple[int, ...]:
        shape = list(self.full_shape)
        if self.row_dim is not None:
            shape[self.row_dim] //= grid.size("row")
        if self.col_dim is not None:
            shape[self.col_dim] //= grid.size("col")
        return tuple(shape)

    def stored_block_shape(self, grid: ProcessGrid) -> tuple[int, ...]:
        """The block's shape as this rank stores it (before any depth split)."""
        shape = self.block_shape(grid)
        return shape[::-1] if self.transposed else shape

    def copies(self, grid: ProcessGrid) -> int:
        """How many ranks of one model replica (depth x row x col) hold the same values: for global norms."""
        copies = 1 if self.depth else grid.size("depth")
        copies *= 1 if self.row_dim is not None else grid.size("row")
        copies *= 1 if self.col_dim is not None else grid.size("col")
        return copies


def shard(full: torch.Tensor, layout: Layout, grid: ProcessGrid) -> torch.Tensor:
    """This rank's piece of a full tensor (every rank holds the full tensor; no communication)."""
    piece = full
    if layout.row_dim is not None:
        piece = piece.chunk(grid.size("row"), dim=layout.row_dim)[grid.index("row")]
    if layout.col_dim is not None:
        piece = piece.chunk(grid.size("col"), dim=layout.col_dim)[grid.index("col")]
    if layout.transposed:
        piece = piece.t()
    if layout.depth:
        flat = piece.reshape(-1)
        depth = grid.size("depth")
        padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % depth))
        piece = padded.chunk(depth)[grid.index("depth")]
    return piece.detach().clone().contiguous()


def gather_block(local: torch.Tensor, layout: Layout, grid: ProcessGrid) -> torch.Tensor:
    """Undo the depth split and the storage transpose: the rank's [row, col] block, in the full tensor's order."""
    block = local
    if layout.depth:
        stored = layout.stored_block_shape(grid)
        numel = 1
        for size in stored:
            numel *= size
        block = all_gather_flat(local, grid.groups["depth"])[:numel].view(stored)
    return block.t().contiguous() if layout.transposed else block


def _gather_dim(block: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None:
        return block
    pieces = [torch.empty_like(block) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, block.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def unshard(local: torch.Tensor, layout: Layout, grid: ProcessGrid) -> torch.Tensor:
    """The full tensor, on every rank (collective: every rank of the model replica must call it)."""
    full = gather_block(local, layout, grid)
    if layout.col_dim is not None:
        full = _gather_dim(full, layout.col_dim, grid.groups["col"])
    if layout.row_dim is not None:
        full = _gather_dim(full, layout.row_dim, grid.groups["row"])
    return full
