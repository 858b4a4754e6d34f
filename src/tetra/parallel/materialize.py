"""Give a model that parallelize() split while it was still on the meta device its real values, each rank reading
only the rectangles of each full tensor its piece holds (its block, or its depth shard's part of it). The result
equals shard(full tensor) on every rank, bit for bit.

Entry points: local_piece(source, name, layout, grid), materialize(model, grid, source, device).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tetra.model.weight_sources import WeightSource
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout
from tetra.parallel.pieces import block_region, local_views, rank_rectangles


def local_piece(source: WeightSource, name: str, layout: Layout, grid: ProcessGrid) -> torch.Tensor:
    """This rank's stored piece of parameter `name` (what layout.shard(full) gives), reading only the rectangles of
    the full tensor it holds (pieces.rank_rectangles), each straight into its place in the piece."""
    rectangles = rank_rectangles(layout, grid.shape, grid.coords)
    values = [source.read(name, tuple((o, o + s) for o, s in zip(r.offsets, r.sizes, strict=True)))
              for r in rectangles]
    if not layout.depth:
        return (values[0].t() if layout.transposed else values[0]).contiguous()
    numel = math.prod(stop - start for start, stop in block_region(layout, grid.shape, grid.coords))
    piece = torch.zeros(-(-numel // grid.size("depth")), dtype=values[0].dtype if values else torch.float32)
    for view, value in zip(local_views(piece, layout, rectangles), values, strict=True):
        view.copy_(value)
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
            tags = {key: value for key, value in vars(parameter).items() if key.startswith("tetra_")}
            value = local_piece(source, name, layout, grid).to(device=device, dtype=dtype or parameter.dtype)
            torch.utils.swap_tensors(parameter, nn.Parameter(value, requires_grad=parameter.requires_grad))
            vars(parameter).update(tags, tetra_layout=layout)  # the swap takes the new tensor's (empty) attributes
    return model
