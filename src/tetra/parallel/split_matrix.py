"""A weight matrix as the 4D grid splits it, seen by an optimizer that needs whole-matrix algebra (GaLore's
projection, Conda's rotation): this rank's [m_i, n_j] block, the groups that split each side, and the collectives
that turn block products into the products of the whole matrix.

For W [m, n] split over rows into m_i and over columns into n_j (either group on either side, or none), with the
block sharded over depth: P^T W for P [m, r] is the sum over the side-0 group of P_i^T W_ij, W P for P [n, r] the
sum over the side-1 group of W_ij P_j, and the products back (P N, N P^T) are local once N's piece is known.
This class cuts and reassembles the pieces; the optimizer runs the collectives between them for all matrices at
once (parallel/batched_collectives.py). On one process (grid None) every piece is the whole, so the optimizers run
one code path everywhere.

Entry point: SplitMatrix.of(parameter, grid) (grid None: the whole matrix on one process).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tetra.parallel.collectives import Group
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout, unshard


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
        """The process group splitting the matrix's side (None when unsplit): where products over it are summed."""
        name = self.group_name(side)
        return None if name is None else self.grid.groups[name]

    def depth_group(self) -> Group:
        """The group the block is sharded over (None when it is not): where its pieces are gathered."""
        return self.grid.groups["depth"] if self.grid is not None and self.layout.depth else None

    def block_numel(self) -> int:
        """Values in this rank's whole [m_i, n_j] block (before any depth split)."""
        return math.prod(self.shape) if self.grid is None else math.prod(self.layout.block_shape(self.grid))

    # -- pieces (no communication; the collectives between them are batched over many matrices by the caller) --

    def block_from(self, gathered: torch.Tensor) -> torch.Tensor:
        """The [m_i, n_j] block from a weight-shaped tensor gathered over depth (the local tensor itself when the
        block is not depth-sharded)."""
        if self.grid is None:
            return gathered
        stored = self.layout.stored_block_shape(self.grid)
        block = gathered[:math.prod(stored)].view(stored) if self.layout.depth else gathered.view(stored)
        return block.t() if self.layout.transposed else block

    def partial_block(self, local: torch.Tensor) -> torch.Tensor:
        """The [m_i, n_j] block holding only this depth rank's values (zeros elsewhere): the depth group's partial
        blocks sum to the block, so a product linear in it can be summed over depth after the GEMM, on the small
        result, instead of gathering the block before it. (Each rank still multiplies a whole block, mostly
        zeros: communication saved, not arithmetic.)"""
        if self.grid is None or not self.layout.depth:
            return self.block_from(local)
        flat = local.new_zeros(local.numel() * self.grid.size("depth"))
        start = self.grid.index("depth") * local.numel()
        flat[start:start + local.numel()] = local
        return self.block_from(flat)

    def local(self, block: torch.Tensor) -> torch.Tensor:
        """The rank's stored piece of a [m_i, n_j] block (its GEMM orientation and depth shard): the parameter's
        shape."""
        if self.grid is None:
            return block
        stored = block.t() if self.layout.transposed else block
        return self.depth_piece(stored)

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The whole [m, n] matrix on every rank (collective over the replica: for the rare refresh)."""
        return local if self.grid is None else unshard(local, self.layout, self.grid)

    def chunk(self, tensor: torch.Tensor, side: int) -> torch.Tensor:
        """This rank's rows of a tensor whose rows run over the matrix's side `side`: a contiguous copy, so a slice
        of SVD factors does not keep the whole factor alive (or compute differently from a resumed copy)."""
        name = self.group_name(side)
        if name is None:
            return tensor.contiguous()
        return tensor.chunk(self.grid.size(name))[self.grid.index(name)].contiguous()

    def depth_piece(self, tensor: torch.Tensor) -> torch.Tensor:
        """This depth rank's flat, zero-padded share of a tensor every depth rank holds whole (flat even over a
        depth of one, as a depth-sharded weight is stored)."""
        if self.grid is None or not self.layout.depth:
            return tensor.contiguous()
        flat, parts = tensor.reshape(-1), self.grid.size("depth")
        padded = F.pad(flat, (0, (-flat.numel()) % parts))
        return padded.chunk(parts)[self.grid.index("depth")].clone()

    @staticmethod
    def whole_from(gathered: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Undo depth_piece on the depth-gathered pieces: the first numel values, in `shape`."""
        return gathered.reshape(-1)[:math.prod(shape)].view(shape)

    @staticmethod
    def side_major(tensor: torch.Tensor, side: int) -> torch.Tensor:
        """A 2-D tensor flattened with `side` outermost, so that equal flat slices are chunks along that side."""
        return tensor.movedim(side, 0).contiguous().reshape(-1)

    @staticmethod
    def from_side_major(flat: torch.Tensor, shape: tuple[int, int], side: int) -> torch.Tensor:
        """Undo side_major for a tensor of `shape`."""
        return flat.view(shape[side], shape[1 - side]).movedim(0, side)

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
