"""Give a model that parallelize() split while it was still on the meta device its real values, each rank reading
only the region of each full tensor its piece comes from (and, when the block is sharded over depth, only the rows
of the block its depth shard covers). The result equals shard(full tensor) on every rank, bit for bit.

Entry points: local_piece(source, name, layout, grid), materialize(model, grid, source, device).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tetra.model.weight_sources import WeightSource
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout
from tetra.parallel.pieces import block_region


def local_piece(source: WeightSource, name: str, layout: Layout, grid: ProcessGrid) -> torch.Tensor:
    """This rank's stored piece of parameter `name` (what layout.shard(full) gives), reading only what it needs."""
    region = block_region(layout, grid.shape, grid.coords)
    if not layout.depth:
        value = source.read(name, tuple(map(tuple, region)))
        return (value.t() if layout.transposed else value).contiguous()
    stored = [stop - start for start, stop in region]
    stored_rows_dim = 1 if layout.transposed else 0  # the block dimension that runs along the stored rows
    if layout.transposed:
        stored = stored[::-1]
    row_width = math.prod(stored[1:])
    numel, depth = math.prod(stored), grid.size("depth")
    per_rank = -(-numel // depth)
    start, stop = min(grid.index("depth") * per_rank, numel), min((grid.index("depth") + 1) * per_rank, numel)
    piece = torch.zeros(per_rank)
    if stop > start:
        first_row, end_row = start // row_width, -(-stop // row_width)
        offset = region[stored_rows_dim][0]
        region[stored_rows_dim] = [offset + first_row, offset + end_row]
        value = source.read(name, tuple(map(tuple, region)))
        flat = (value.t() if layout.transposed else value).reshape(-1)
        begin = start - first_row * row_width
        piece = piece.to(flat.dtype)
        piece[:stop - start] = flat[begin:begin + stop - start]
    return piece


def materialize(model: nn.Module, grid: ProcessGrid, source: WeightSource, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every meta parameter by this rank's piece read from `source`, keeping each Parameter object (the
    layers' communication schedule knows them by identity), its layout, whether it trains and (dtype=None) its
    dtype (a LoRA run's frozen base may be kept in bf16)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.is_meta:
                continue
            layout = getattr(parameter, "tetra_layout", None) or Layout(tuple(parameter.shape))
            value = local_piece(source, name, layout, grid).to(device=device, dtype=dtype or parameter.dtype)
            torch.utils.swap_tensors(parameter, nn.Parameter(value, requires_grad=parameter.requires_grad))
            parameter.tetra_layout = layout
    return model


