"""The 4D process grid: data x depth x row x column, with the column group innermost (fastest links).

Entry points: GridShape.infer(world, ...), check_grid(shape, config), ProcessGrid.build(shape).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch.distributed as dist

from tetra.errors import ConfigError
from tetra.model.config import ModelConfig

DIMENSIONS = ("data", "depth", "row", "col")


@dataclass(frozen=True)
class GridShape:
    """How many ranks each dimension has."""

    data: int = 1
    depth: int = 1
    row: int = 1
    col: int = 1

    @property
    def world(self) -> int:
        return self.data * self.depth * self.row * self.col

    @classmethod
    def infer(cls, world: int, data: int = 0, depth: int = 0, row: int = 0, col: int = 0) -> GridShape:
        """Sizes from the config, where 0 means 'infer': tensor dimensions default to 1, data takes what is left."""
        depth, row, col = depth or 1, row or 1, col or 1
        tensor = depth * row * col
        if not data:
            if world % tensor:
                raise ConfigError(f"{world} processes cannot hold parallel.depth x row x col = {depth} x {row} x {col}"
                                  f" = {tensor}: the world size must be a multiple of it. Launch a multiple of "
                                  f"{tensor} processes or change the grid.")
            data = world // tensor
        shape = cls(data, depth, row, col)
        if shape.world != world:
            raise ConfigError(f"parallel.data x depth x row x col = {data} x {depth} x {row} x {col} = {shape.world}, "
                              f"but {world} processes were launched. Make the product equal the world size (or "
                              "leave parallel.data at 0 to infer it).")
        return shape

    def coordinates(self, rank: int) -> dict[str, int]:
        """(data, depth, row, col) of a rank: rank = ((data * depth + z) * row + r) * col + c."""
        rank, col = divmod(rank, self.col)
        rank, row = divmod(rank, self.row)
        data, depth = divmod(rank, self.depth)
        return {"data": data, "depth": depth, "row": row, "col": col}

    def rank_of(self, data: int, depth: int, row: int, col: int) -> int:
        return ((data * self.depth + depth) * self.row + row) * self.col + col


def check_grid(shape: GridShape, config: ModelConfig) -> None:
    """Every size a dimension splits must divide by it; all problems are named at once with the fix."""
    problems = []
    splits = [("model.hidden_size", config.hidden_size, "col", shape.col),
              ("model.n_heads", config.n_heads, "row", shape.row),
              ("model.n_kv_heads", config.kv_heads, "row", shape.row),
              ("the MLP width (model.intermediate_size)", config.mlp_width, "row", shape.row),
              ("model.vocab_size", config.vocab_size, "row", shape.row)]
    for name, value, dimension, size in splits:
        if value % size:
            problems.append(f"{name} = {value} does not divide by parallel.{dimension} = {size}")
    if problems:
        raise ConfigError("This grid cannot split this model:\n  - " + "\n  - ".join(problems)
                          + "\nChoose grid sizes that divide these numbers (or pad the vocabulary).")


class ProcessGrid:
    """This rank's place in the grid and the process groups of each dimension (None where a dimension is 1)."""

    def __init__(self, shape: GridShape, rank: int, groups: dict[str, dist.ProcessGroup | None]) -> None:
        self.shape, self.rank, self.groups = shape, rank, groups
        self.coords = shape.coordinates(rank)

    def size(self, name: str) -> int:
        """Ranks in a group: a dimension or 'batch' (data x depth, the ranks that see different samples)."""
        if name == "batch":
            return self.shape.data * self.shape.depth
        if name == "model":
            return self.shape.depth * self.shape.row * self.shape.col
        return getattr(self.shape, name)

    def index(self, name: str) -> int:
        if name == "batch":
            return self.coords["data"] * self.shape.depth + self.coords["depth"]
        return self.coords[name]

    @classmethod
    def build(cls, shape: GridShape) -> ProcessGrid:
        """Create every group (all ranks must call this, in the same order). Needs torch.distributed initialized."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if shape.world != world:
            raise ConfigError(f"The grid has {shape.world} ranks but {world} processes are running.")
        rank = dist.get_rank() if dist.is_initialized() else 0
        groups: dict[str, dist.ProcessGroup | None] = {}
        varying = {"data": ("data",), "depth": ("depth",), "row": ("row",), "col": ("col",),
                   "batch": ("data", "depth"), "model": ("depth", "row", "col")}
        mine = shape.coordinates(rank)
        for name, dims in varying.items():
            if all(getattr(shape, d) == 1 for d in dims):
                groups[name] = None
                continue
            fixed = [d for d in DIMENSIONS if d not in dims]
            for fixed_values in itertools.product(*(range(getattr(shape, d)) for d in fixed)):
                members = []
                for varying_values in itertools.product(*(range(getattr(shape, d)) for d in dims)):
                    coords = dict(zip(fixed, fixed_values, strict=True)) | dict(zip(dims, varying_values, strict=True))
                    members.append(shape.rank_of(**coords))
                group = dist.new_group(sorted(members))
                if all(mine[d] == v for d, v in zip(fixed, fixed_values, strict=True)):
                    groups[name] = group
        return cls(shape, rank, groups)
