"""Sharded checkpoints for 4D-parallel runs: each rank writes the pieces it stores (its [row, col] blocks, or their
depth shards as rectangles of the full tensors) with torch.distributed.checkpoint; loading reshards them onto any
grid, each rank reading only its own pieces.

Entry points: shard_state(model, optimizer, grid) (what checkpoint_write saves) and
load_shards(folder, model, optimizer, grid).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch

from tetra.errors import CheckpointError
from tetra.model import Transformer
from tetra.model.sharded_io import SHARDS, sharded_metadata
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout
from tetra.parallel.pieces import Rectangle, local_views, rank_rectangles
from tetra.parallel.zero import optimizer_state_of, set_optimizer_state

# torch.distributed.checkpoint and its sharded-tensor type are imported inside the functions: they cost over a
# second at start-up, and only parallel runs that save or load need them.


def _all_rectangles(layout: Layout, grid: ProcessGrid) -> list[Rectangle]:
    """Every distinct rectangle the ranks of one model replica store (a replicated block counted once)."""
    shape, seen, found = grid.shape, set(), []
    for depth, row, col in itertools.product(range(shape.depth), range(shape.row), range(shape.col)):
        for rectangle in rank_rectangles(layout, shape, {"data": 0, "depth": depth, "row": row, "col": col}):
            if rectangle.offsets not in seen:
                seen.add(rectangle.offsets)
                found.append(rectangle)
    return found


def _sharded(local: torch.Tensor, layout: Layout, grid: ProcessGrid,
             everywhere: dict[Layout, list[Rectangle]]) -> Any:
    """The rank's stored tensor as a ShardedTensor of the full tensor whose local shards are views of it (no copy):
    torch.distributed.checkpoint writes (once, if replicated) or fills exactly these rectangles. everywhere: the
    replica's rectangles by layout, filled as needed (weights and their optimizer state share them)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensorBase
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    mine = rank_rectangles(layout, grid.shape, grid.coords)
    device = f"rank:{grid.rank}/{local.device.type}"
    shards = [Shard(view, ShardMetadata(list(rectangle.offsets), list(rectangle.sizes), device))
              for view, rectangle in zip(local_views(local, layout, mine), mine, strict=True)]
    if layout not in everywhere:
        everywhere[layout] = _all_rectangles(layout, grid)
    everyone = [ShardMetadata(list(rectangle.offsets), list(rectangle.sizes), device)
                for rectangle in everywhere[layout]]
    properties = TensorProperties(dtype=local.dtype, layout=torch.strided, requires_grad=False,
                                  memory_format=torch.contiguous_format, pin_memory=False)
    metadata = ShardedTensorMetadata(everyone, torch.Size(layout.full_shape), properties)
    sharded = ShardedTensorBase._init_from_local_shards_and_global_metadata(shards, metadata)
    sharded._process_group = None  # read by its size() dispatch; the checkpoint's own collectives pick the group
    return sharded


def state_layout(optimizer: object | None, parameter: torch.Tensor, key: str) -> Layout | None:
    """The layout of one optimizer state tensor: its own for state not shaped like the parameter (GaLore's
    projected moments and projector, Conda's basis), else the parameter's (None off the grid)."""
    layouts = getattr(optimizer, "state_layouts", None)
    own = {} if layouts is None else layouts(parameter)
    return own.get(key, getattr(parameter, "tetra_layout", None))


def check_state_shape(folder: Path, key: str, found: tuple[int, ...], optimizer: object,
                      parameter: torch.Tensor) -> None:
    """Refuse optimizer state that this run's optimizer would not shape so (another optimizer or GaLore rank)
    before any of it is read, naming the tensor and the fix."""
    field = key.rsplit("/", 1)[1]
    layout = state_layout(optimizer, parameter, field)
    expected = tuple(layout.full_shape) if layout is not None else tuple(parameter.shape)
    if len(found) and tuple(found) != expected:
        raise CheckpointError(f"The optimizer state {key} in {folder} has shape {tuple(found)}, but this run's "
                              f"optimizer keeps it as {expected}: the run was started with another train.optimizer "
                              "or train.galore_rank. Resume with the settings the run was started with, or start a "
                              "new run from its weights with init.checkpoint.")


def _local_shape(layout: Layout, grid: ProcessGrid) -> tuple[int, ...]:
    """The shape a rank stores for a layout: its block (as stored), or its flat depth shard."""
    block = layout.stored_block_shape(grid)
    return (-(-math.prod(block) // grid.size("depth")),) if layout.depth else block


def _entries(model: Transformer, optimizer: torch.optim.Optimizer):
    """(checkpoint name, tensor or number, its layout; None for a scalar) for weights and optimizer state."""
    for name, parameter in model.named_parameters():
        yield f"model/{name}", parameter, parameter.tetra_layout
        for key, value in optimizer_state_of(optimizer, parameter).items():
            scalar = not torch.is_tensor(value) or value.dim() == 0  # a step count
            yield f"optim/{name}/{key}", value, None if scalar else state_layout(optimizer, parameter, key)


def shard_state(model: Transformer, optimizer: torch.optim.Optimizer, grid: ProcessGrid,
                copy: bool = False) -> dict[str, Any]:
    """This rank's stored pieces of weights and optimizer state as sharded tensors of the full tensors, ready for
    torch.distributed.checkpoint.save, which writes replicated pieces once. Depth shards are written as they are:
    nothing is gathered. copy: a snapshot that later steps cannot change (for a background write)."""
    state, everywhere = {}, {}
    for key, value, layout in _entries(model, optimizer):
        if layout is None:  # a scalar like AdamW's step
            state[key] = torch.as_tensor(value).detach().clone()
        else:
            local = value.detach()
            state[key] = _sharded(local.clone() if copy else local, layout, grid, everywhere)
    return state


def load_shards(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer | None,
                grid: ProcessGrid) -> None:
    """Collective: read this rank's pieces of a sharded checkpoint written on any grid, straight into the weights
    and the optimizer state (each state tensor by its own layout; optimizer=None: the weights only, as a run that
    starts from the checkpoint needs): no rank reads more than it stores."""
    import torch.distributed.checkpoint as dcp

    names = sharded_metadata(folder)
    parameters = dict(model.named_parameters())
    targets, states, everywhere = {}, {}, {}
    for key, item in names.items():
        if optimizer is None and not key.startswith("model/"):
            continue
        name = key.split("/", 1)[1].rsplit("/", 1)[0] if key.startswith("optim/") else key.split("/", 1)[1]
        parameter = parameters[name]
        if len(item.size) == 0:
            targets[key] = torch.zeros((), dtype=item.properties.dtype)
            continue
        layout = parameter.tetra_layout
        if key.startswith("model/"):
            local = parameter.data
        else:
            check_state_shape(folder, key, tuple(item.size), optimizer, parameter)
            layout = state_layout(optimizer, parameter, key.rsplit("/", 1)[1])
            local = torch.zeros(_local_shape(layout, grid), dtype=item.properties.dtype, device=parameter.device)
        states[key] = local
        targets[key] = _sharded(local, layout, grid, everywhere)
    dcp.load(targets, checkpoint_id=str(folder / SHARDS))
    for key, value in targets.items():
        if key.startswith("optim/"):
            name, field = key.split("/", 1)[1].rsplit("/", 1)
            set_optimizer_state(optimizer, parameters[name], field, states.get(key, value))
