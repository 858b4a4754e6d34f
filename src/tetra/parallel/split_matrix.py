"""A weight matrix as the 4D grid splits it, seen by an optimizer that needs whole-matrix algebra (GaLore's
projection, Conda's rotation): this rank's [m_i, n_j] block, the groups that split each side, and the collectives
that turn block products into the products of the whole matrix.

For W [m, n] split over rows into m_i and over columns into n_j (either group on either side, or none), with the
block sharded over depth: P^T W for P [m, r] is the sum over the side-0 group of P_i^T W_ij, W P for P [n, r] the
sum over the side-1 group of W_ij P_j, and the products back (P N, N P^T) are local once N's piece is known.
On one process (grid None) every collective is the identity, so the optimizers run one code path everywhere.

Entry point: SplitMatrix.of(parameter, grid) (grid None: the whole matrix on one process).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tetra.parallel.collectives import Group, _size, all_gather_flat, all_reduce, reduce_scatter_flat
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout, gather_block, unshard


class SplitMatrix:
    """How one 2-D parameter is split, and the block algebra over its groups."""

    def __init__(self, layout: Layout, grid: ProcessGrid | None) -> None:
        if len(layout.full_shape) != 2:
            raise ValueError(f"SplitMatrix needs a 2-D layout (got full shape {layout.full_shape})")
        self.layout, self.grid = layout, grid
        self.shape: tuple[int, int] = tuple(layout.full_shape)  # type: ignore[assignment]

    @classmethod
    def of(cls, parameter: torch.Tensor, grid: ProcessGrid | None) -> SplitMatrix:
        """The parameter's own layout on a grid; the whole matrix on one process."""
        layout = getattr(parameter, "tetra_layout", None)
        if grid is None or layout is None:
            return cls(Layout(tuple(parameter.shape)), None)
        return cls(layout, grid)

    # -- groups -------------------------------------------------------------------------------------------------

    def group_name(self, side: int) -> str | None:
        """'row' or 'col' when that grid dimension splits the matrix's side (0: rows, 1: columns), else None."""
        if self.grid is None:
            return None
        if self.layout.row_dim == side:
            return "row"
        return "col" if self.layout.col_dim == side else None

    def group(self, side: int) -> Group:
        name = self.group_name(side)
        return None if name is None else self.grid.groups[name]

    def depth_group(self) -> Group:
        return self.grid.groups["depth"] if self.grid is not None and self.layout.depth else None

    # -- pieces -------------------------------------------------------------------------------------------------

    def block(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's [m_i, n_j] block of a weight-shaped tensor (collective over depth when sharded)."""
        if self.grid is None:
            return local
        return gather_block(local, self.layout, self.grid)

    def local(self, block: torch.Tensor) -> torch.Tensor:
        """The rank's stored piece of a [m_i, n_j] block (its GEMM orientation and depth shard): the parameter's
        shape."""
        if self.grid is None:
            return block
        stored = block.t() if self.layout.transposed else block
        return self.depth_piece(stored)

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The whole [m, n] matrix on every rank (collective over the replica)."""
        return local if self.grid is None else unshard(local, self.layout, self.grid)

    def chunk(self, tensor: torch.Tensor, side: int, dim: int = 0) -> torch.Tensor:
        """This rank's chunk, along `dim`, of a tensor whose `dim` runs over the matrix's side `side`."""
        name = self.group_name(side)
        if name is None:
            return tensor
        return tensor.chunk(self.grid.size(name), dim=dim)[self.grid.index(name)].contiguous()

    def depth_piece(self, tensor: torch.Tensor) -> torch.Tensor:
        """This depth rank's flat, zero-padded share of a tensor every depth rank holds whole (flat even over a
        depth of one, as a depth-sharded weight is stored)."""
        if self.grid is None or not self.layout.depth:
            return tensor.contiguous()
        flat, parts = tensor.reshape(-1), self.grid.size("depth")
        padded = F.pad(flat, (0, (-flat.numel()) % parts))
        return padded.chunk(parts)[self.grid.index("depth")].clone()

    def depth_whole(self, piece: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Undo depth_piece: the whole tensor of `shape` on every depth rank."""
        group = self.depth_group()
        if group is None:
            return piece.view(shape)
        numel = 1
        for size in shape:
            numel *= size
        return all_gather_flat(piece.contiguous(), group)[:numel].view(shape)

    def state_layout(self, full_shape: tuple[int, int], splits: dict[int, int], depth: bool) -> Layout:
        """The Layout of a state tensor of `full_shape` whose dimension d is split like the matrix's side
        splits[d] (for checkpoints, which store it by rectangles of its full shape like any weight)."""
        row_dim = col_dim = None
        for dim, side in splits.items():
            name = self.group_name(side)
            if name == "row":
                row_dim = dim
            elif name == "col":
                col_dim = dim
        return Layout(tuple(full_shape), row_dim=row_dim, col_dim=col_dim, depth=depth and self.layout.depth)

    # -- sums over a side's group -------------------------------------------------------------------------------

    def sum_over(self, side: int, tensor: torch.Tensor) -> torch.Tensor:
        """Sum partial products over the group splitting `side` (in place; the identity when unsplit)."""
        return all_reduce(tensor, self.group(side))

    def sum_and_chunk(self, side: int, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum over the group splitting `side` and keep this rank's chunk along `dim` (a reduce-scatter)."""
        group = self.group(side)
        if _size(group) == 1:
            return tensor
        moved = tensor.movedim(dim, 0).contiguous()
        piece = reduce_scatter_flat(moved.reshape(-1), group)
        return piece.view(moved.shape[0] // _size(group), *moved.shape[1:]).movedim(0, dim)

    def gather_chunks(self, side: int, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's chunk along `dim` over the group splitting `side`."""
        group = self.group(side)
        if _size(group) == 1:
            return tensor
        moved = tensor.movedim(dim, 0).contiguous()
        whole = all_gather_flat(moved.reshape(-1), group)
        return whole.view(moved.shape[0] * _size(group), *moved.shape[1:]).movedim(0, dim)
