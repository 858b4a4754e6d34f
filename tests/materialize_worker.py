"""Worker for the meta-device tests: a model built on the meta device, split, then given its values piece by piece
(random init, or read from a checkpoint) must equal the single-process model built whole and split, bit for bit.

Entry point: check_materialize(rank, world, port, cases, out_path), started by spawn_collect.
"""

from __future__ import annotations

import copy
import math

import torch

from parallel_worker import MODELS, run_cases
from tetra.model import ModelConfig, Transformer
from tetra.model.initialization import init_rules
from tetra.model.io import load_model, read_model_config
from tetra.model.weight_sources import RandomWeights, open_weights
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.materialize import materialize
from tetra.parallel.parallelize import linear_block_shapes, parallelize

SEED, STD = 7, 0.2


def _split(model: Transformer, grid: ProcessGrid, gemm_layout: str) -> Transformer:
    return parallelize(model, grid, gemm_layouts=dict.fromkeys(linear_block_shapes(model, grid), gemm_layout))


def _whole_then_split(source: str, grid: ProcessGrid, gemm_layout: str) -> Transformer:
    if source in MODELS:
        model = Transformer(ModelConfig(**MODELS[source]))
        model.init_weights(STD, seed=SEED)
    else:
        model = load_model(source, dtype=torch.float32)
    return _split(copy.deepcopy(model), grid, gemm_layout)


class _Recording:
    """A weight source that notes how many values each read asked for."""

    def __init__(self, inner) -> None:
        self.inner, self.shapes, self.values_read = inner, inner.shapes, {}

    def read(self, name, region):
        self.values_read[name] = self.values_read.get(name, 0) + math.prod(stop - start for start, stop in region)
        return self.inner.read(name, region)


def _meta_then_materialize(source: str, grid: ProcessGrid, gemm_layout: str) -> tuple[Transformer, _Recording]:
    config = ModelConfig(**MODELS[source]) if source in MODELS else read_model_config(source)
    with torch.device("meta"):
        model = Transformer(config)
    if source in MODELS:
        shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
        weights = RandomWeights(init_rules(model, STD), shapes, SEED)
    else:
        weights = open_weights(source, model)
    recording = _Recording(weights)
    return materialize(_split(model, grid, gemm_layout), grid, recording), recording


def _check(source: str, shape: dict, gemm_layout: str = "out_in") -> dict:
    grid = ProcessGrid.build(GridShape(**shape))
    expected = dict(_whole_then_split(source, grid, gemm_layout).named_parameters())
    model, recording = _meta_then_materialize(source, grid, gemm_layout)
    actual = dict(model.named_parameters())
    # Each rank reads its block, and of a depth-sharded block only the stored rows its shard touches.
    over_read = [name for name, value in actual.items()
                 if recording.values_read[name] > value.numel() + 2 * _stored_row(value)]
    different = [name for name, value in expected.items()
                 if name not in actual or actual[name].shape != value.shape or not torch.equal(actual[name], value)
                 or actual[name].requires_grad != value.requires_grad]
    meta = [name for name, value in actual.items() if value.is_meta]
    gathered = torch.tensor([len(different) + len(meta) + len(over_read) + (sorted(actual) != sorted(expected))])
    torch.distributed.all_reduce(gathered)  # rank 0 reports every rank's verdict
    return {"source": source, "grid": shape, "layout": gemm_layout, "different": different, "meta": meta,
            "over_read": over_read, "problems_on_all_ranks": int(gathered)}


def _stored_row(parameter: torch.Tensor) -> int:
    layout = parameter.tetra_layout
    return max(layout.full_shape) if layout.depth else 0


def check_materialize(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    run_cases(_check, rank, world, port, cases, out_path)
