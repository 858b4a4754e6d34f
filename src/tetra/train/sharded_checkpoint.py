"""Sharded checkpoints for 4D-parallel runs: each rank writes its own [row, col] blocks with
torch.distributed.checkpoint; loading reshards them onto any grid.

Entry points: shard_state(model, optimizer, grid) (what checkpoint_write saves) and
load_shards(folder, model, optimizer, grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tetra.model import Transformer
from tetra.model.sharded_io import SHARDS, sharded_metadata
from tetra.parallel.grid import DIMENSIONS, ProcessGrid
from tetra.parallel.layout import Layout, gather_block, shard
from tetra.parallel.zero import optimizer_state_of, set_optimizer_state

# torch.distributed.checkpoint and DTensor are imported inside the functions: together they cost over a second at
# start-up, and only parallel runs that save or load need them.


def _mesh(grid: ProcessGrid, device: torch.device) -> Any:
    """A DeviceMesh with the grid's rank order (row-major over data, depth, row, col, like ProcessGrid)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(grid.shape, name) for name in DIMENSIONS)
    return init_device_mesh(device.type, shape, mesh_dim_names=DIMENSIONS)


def _placements(layout: Layout) -> list:
    """Replicated over data and depth (depth shards are gathered to whole blocks), split like the layout."""
    from torch.distributed.tensor import Replicate, Shard

    row = Shard(layout.row_dim) if layout.row_dim is not None else Replicate()
    col = Shard(layout.col_dim) if layout.col_dim is not None else Replicate()
    return [Replicate(), Replicate(), row, col]


def _as_dtensor(block: torch.Tensor, layout: Layout, mesh: Any) -> Any:
    from torch.distributed.tensor import DTensor

    full = torch.empty(layout.full_shape, device="meta")
    return DTensor.from_local(block, mesh, _placements(layout), shape=full.shape, stride=full.stride())


def _entries(model: Transformer, optimizer: torch.optim.Optimizer):
    """(checkpoint name, tensor, its parameter) for weights and optimizer state."""
    for name, parameter in model.named_parameters():
        yield f"model/{name}", parameter, parameter
        for key, value in optimizer_state_of(optimizer, parameter).items():
            yield f"optim/{name}/{key}", value, parameter


def shard_state(model: Transformer, optimizer: torch.optim.Optimizer, grid: ProcessGrid,
                copy: bool = False) -> dict[str, Any]:
    """Collective (depth shards are gathered): this rank's blocks of weights and optimizer state as DTensors,
    ready for torch.distributed.checkpoint.save, which writes replicated pieces once. copy: a snapshot that later
    steps cannot change (for a background write)."""
    mesh = _mesh(grid, next(model.parameters()).device)
    state = {}
    for key, value, parameter in _entries(model, optimizer):
        layout = parameter.tetra_layout
        if value.shape != parameter.shape:  # a scalar like AdamW's step
            state[key] = value.detach().clone()
        else:
            block = gather_block(value.detach(), layout, grid)
            state[key] = _as_dtensor(block.clone() if copy else block, layout, mesh)
    return state


def load_shards(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer, grid: ProcessGrid) -> None:
    """Collective: read this rank's pieces of a sharded checkpoint written on any grid."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    mesh = _mesh(grid, next(model.parameters()).device)
    names = sharded_metadata(folder)
    parameters = dict(model.named_parameters())
    targets = {}
    for key, item in names.items():
        name = key.split("/", 1)[1].rsplit("/", 1)[0] if key.startswith("optim/") else key.split("/", 1)[1]
        layout = parameters[name].tetra_layout
        if len(item.size) == 0:
            targets[key] = torch.zeros((), dtype=item.properties.dtype)
        else:
            block = torch.zeros(layout.block_shape(grid), dtype=item.properties.dtype)
            targets[key] = _as_dtensor(block, layout, mesh)
    dcp.load(targets, checkpoint_id=str(folder / SHARDS))
    with torch.no_grad():
        for key, value in targets.items():
            name = key.split("/", 1)[1]
            if key.startswith("model/"):
                parameter = parameters[name]
                parameter.copy_(_depth_piece(value.to_local(), parameter.tetra_layout, grid))
            else:
                name, field = name.rsplit("/", 1)
                parameter = parameters[name]
                local = value if not isinstance(value, DTensor) else _depth_piece(value.to_local(),
                                                                                   parameter.tetra_layout, grid)
                set_optimizer_state(optimizer, parameter, field, local)


def _depth_piece(block: torch.Tensor, layout: Layout, grid: ProcessGrid) -> torch.Tensor:
    """What this rank stores of a whole [row, col] block: transposed if its layout says so, then its depth shard."""
    if not layout.depth and not layout.transposed:
        return block
    return shard(block, Layout(tuple(block.shape), depth=layout.depth, transposed=layout.transposed), grid)
