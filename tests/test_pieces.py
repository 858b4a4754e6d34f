"""The rectangles each rank's stored piece holds tile the full tensor exactly, and views of a rank's piece hold
the full tensor's values there: what lets checkpoints be written and read depth shard by depth shard."""

from __future__ import annotations

import itertools

import pytest
import torch

from tetra.parallel.grid import GridShape
from tetra.parallel.layout import Layout
from tetra.parallel.pieces import local_views, rank_rectangles


class _FakeGrid:
    """What layout.shard reads of a grid: sizes and this rank's indices."""

    def __init__(self, shape: GridShape, coordinates: dict[str, int]) -> None:
        self.shape, self.coordinates = shape, coordinates

    def size(self, name: str) -> int:
        return getattr(self.shape, name)

    def index(self, name: str) -> int:
        return self.coordinates[name]


@pytest.mark.parametrize("layout", [
    Layout((12, 10), row_dim=0, col_dim=1, depth=True), Layout((12, 10), row_dim=1, col_dim=0, depth=True),
    Layout((12, 10), row_dim=0, col_dim=1, depth=True, transposed=True),
    Layout((9, 7), row_dim=0, col_dim=1, depth=True),  # padded depth shards, odd rows
    Layout((10,), col_dim=0), Layout((6, 8), col_dim=1)])
@pytest.mark.parametrize("sizes", [(1, 1, 1), (3, 1, 1), (4, 1, 1), (2, 3, 1), (2, 2, 2), (2, 1, 1)])
def test_rectangles_tile_the_tensor_and_views_hold_its_values(layout, sizes):
    from tetra.parallel.layout import shard

    depth, row, col = sizes
    if any(dim is not None and layout.full_shape[dim] % size for dim, size in ((layout.row_dim, row),
                                                                               (layout.col_dim, col))):
        pytest.skip("the grid does not divide this tensor")
    shape = GridShape(1, depth, row, col)
    full = torch.arange(float(torch.tensor(layout.full_shape).prod())).view(layout.full_shape)
    covered = torch.zeros(layout.full_shape, dtype=torch.long)
    for d, r, c in itertools.product(range(depth), range(row), range(col)):
        coordinates = {"data": 0, "depth": d, "row": r, "col": c}
        rectangles = rank_rectangles(layout, shape, coordinates)
        piece = shard(full, layout, _FakeGrid(shape, coordinates))
        for view, rectangle in zip(local_views(piece, layout, rectangles), rectangles, strict=True):
            where = tuple(slice(o, o + s) for o, s in zip(rectangle.offsets, rectangle.sizes, strict=True))
            assert torch.equal(view, full[where]), (coordinates, rectangle)
            if layout.depth or d == 0 and (layout.row_dim is not None or r == 0) and \
                    (layout.col_dim is not None or c == 0):
                covered[where] += 1
    assert torch.equal(covered, torch.ones_like(covered))  # every element exactly once


def test_sharded_checkpoints_move_between_grids_without_joining_depth_shards(tmp_path):
    from checkpoint_grid_worker import check_checkpoint_grids
    from tetra.parallel.launch import spawn_collect

    folder = str(tmp_path)
    cases = [("odd", dict(depth=4), dict(row=1, col=1, data=4), "out_in", "out_in", folder),  # padded shards
             ("llama", dict(depth=2, col=2), dict(row=2, col=2), "in_out", "out_in", folder),
             ("gpt2", dict(depth=2, row=2), dict(data=2, depth=2), "out_in", "in_out", folder),
             ("llama", dict(row=2, col=2), dict(depth=4), "out_in", "in_out", folder)]
    for result in spawn_collect(check_checkpoint_grids, 4, cases):
        assert result["failures"] == 0 and not result["different"], result
