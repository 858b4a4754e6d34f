"""The process grid: shape inference, rank placement (column innermost), and divisibility errors that name the fix."""

from __future__ import annotations

import pytest

from tetra.errors import ConfigError
from tetra.model import ModelConfig
from tetra.parallel.grid import GridShape, check_grid


def test_shape_inference_fills_data_from_the_world():
    assert GridShape.infer(8, row=2, col=2) == GridShape(data=2, depth=1, row=2, col=2)
    assert GridShape.infer(4) == GridShape(data=4)
    assert GridShape.infer(8, data=1, depth=2, row=2, col=2).world == 8


def test_impossible_shapes_are_explained():
    with pytest.raises(ConfigError, match="must be a multiple of it"):
        GridShape.infer(6, row=4)
    with pytest.raises(ConfigError, match="= 8, but 4 processes were launched"):
        GridShape.infer(4, data=2, row=2, col=2)


def test_column_is_innermost_then_row_depth_data():
    shape = GridShape(data=2, depth=2, row=2, col=2)
    assert shape.coordinates(1) == {"data": 0, "depth": 0, "row": 0, "col": 1}
    assert shape.coordinates(2) == {"data": 0, "depth": 0, "row": 1, "col": 0}
    assert shape.coordinates(4) == {"data": 0, "depth": 1, "row": 0, "col": 0}
    assert shape.coordinates(8) == {"data": 1, "depth": 0, "row": 0, "col": 0}
    assert all(shape.rank_of(**shape.coordinates(rank)) == rank for rank in range(16))


def test_every_indivisible_size_is_named():
    config = ModelConfig(vocab_size=1001, hidden_size=96, n_heads=6, n_kv_heads=2, intermediate_size=250)
    with pytest.raises(ConfigError) as error:
        check_grid(GridShape(row=4, col=5), config)
    message = str(error.value)
    for expected in ("model.hidden_size = 96 does not divide by parallel.col = 5",
                     "model.n_heads = 6 does not divide by parallel.row = 4",
                     "model.n_kv_heads = 2 does not divide by parallel.row = 4",
                     "intermediate_size) = 250 does not divide by parallel.row = 4",
                     "model.vocab_size = 1001 does not divide by parallel.row = 4"):
        assert expected in message
    check_grid(GridShape(row=2, col=2), ModelConfig(vocab_size=1000, hidden_size=96, n_heads=6, n_kv_heads=2,
                                                    intermediate_size=250))
