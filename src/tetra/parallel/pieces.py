"""The rectangles of the full tensor that one rank's stored piece holds: a [row, col] block, or, for a block
sharded over depth (a flat, zero-padded range of the stored block), up to three rectangles (the end of a row, whole
rows, the start of a row). What lets a checkpoint be written and read shard by shard, in full-tensor coordinates,
with no rank ever joining the depth shards into whole blocks.

Entry points: Rectangle, rank_rectangles(layout, shape, coordinates), local_views(local, layout, rectangles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetra.parallel.grid import GridShape
from tetra.parallel.layout import Layout


@dataclass(frozen=True)
class Rectangle:
    """offsets/sizes in the full tensor; start: where its values begin in the rank's flat stored piece; rows/cols:
    its shape as stored (swapped relative to the full tensor when the layout is transposed)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int = 0
    stored: tuple[int, int] | None = None


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    step = -(-size // parts)
    return min(index * step, size), min((index + 1) * step, size)


def block_region(layout: Layout, shape: GridShape, coordinates: dict[str, int]) -> list[list[int]]:
    """[start, stop] per dimension of the full tensor: the rank's [row, col] block."""
    region = [[0, size] for size in layout.full_shape]
    for dim, name in ((layout.row_dim, "row"), (layout.col_dim, "col")):
        if dim is not None:
            start, stop = _chunk(layout.full_shape[dim], getattr(shape, name), coordinates[name])
            region[dim] = [start, stop]
    return region


def rank_rectangles(layout: Layout, shape: GridShape, coordinates: dict[str, int]) -> list[Rectangle]:
    """The full-tensor rectangles the rank at `coordinates` stores (none when its depth shard is all padding)."""
    region = block_region(layout, shape, coordinates)
    if not layout.depth:
        return [Rectangle(tuple(start for start, _ in region), tuple(stop - start for start, stop in region))]
    rows, cols = (region[1][1] - region[1][0], region[0][1] - region[0][0]) if layout.transposed else \
        (region[0][1] - region[0][0], region[1][1] - region[1][0])
    numel = rows * cols
    per_rank = -(-numel // shape.depth)
    start, stop = min(coordinates["depth"] * per_rank, numel), min((coordinates["depth"] + 1) * per_rank, numel)
    stored = []  # (first row, last row + 1, first col, last col + 1) in the stored block
    position = start
    while position < stop:
        row, col = divmod(position, cols)
        if col or stop - position < cols:  # a partial row
            end = min(cols, col + stop - position)
            stored.append((row, row + 1, col, end))
            position += end - col
        else:  # whole rows
            whole = (stop - position) // cols
            stored.append((row, row + whole, 0, cols))
            position += whole * cols
    rectangles = []
    for row0, row1, col0, col1 in stored:
        if layout.transposed:  # stored rows run along the full tensor's columns
            offsets, sizes = (region[0][0] + col0, region[1][0] + row0), (col1 - col0, row1 - row0)
        else:
            offsets, sizes = (region[0][0] + row0, region[1][0] + col0), (row1 - row0, col1 - col0)
        rectangles.append(Rectangle(offsets, sizes, row0 * cols + col0 - start, (row1 - row0, col1 - col0)))
    return rectangles


def local_views(local: torch.Tensor, layout: Layout, rectangles: list[Rectangle]) -> list[torch.Tensor]:
    """Each rectangle as a view of the rank's stored tensor, in full-tensor orientation (writes go through)."""
    if not layout.depth:
        return [local]
    views = []
    for rectangle in rectangles:
        rows, cols = rectangle.stored
        view = local.reshape(-1)[rectangle.start:rectangle.start + rows * cols].view(rows, cols)
        views.append(view.t() if layout.transposed else view)
    return views
