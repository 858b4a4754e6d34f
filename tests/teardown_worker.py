"""One spawned rank of the pattern that once ended in SIGABRT at exit (benchmarks/strategies.py, its first 4D grid):
a depth-4 grid with overlapped prefetches and gradient buckets, a few training steps, a last all-reduce, then the
teardown every tetra process runs. Used by test_teardown.py."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from tetra.config import GoldfishConfig, TrainConfig
from tetra.model import ModelConfig, Transformer
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.launch import end_process_group
from tetra.parallel.parallelize import parallelize
from tetra.train.optim import build_optimizer
from tetra.train.replica import Replica


def run(rank: int, world: int, port: int, steps: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grid = ProcessGrid.build(GridShape.infer(world, 0, world, 0, 0))  # depth = world
    config = ModelConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         intermediate_size=176, max_position_embeddings=32)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    parallelize(model, grid)
    replica = Replica(grid)
    optimizer = build_optimizer(model, TrainConfig(), grid)
    tokens = torch.randint(0, 512, (8, 33), generator=torch.Generator().manual_seed(0))
    local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
    for _ in range(steps):
        replica.accumulate(model, list(local.chunk(2)), GoldfishConfig())
        replica.finish_backward(model, 1.0, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = torch.tensor([float(rank)])
    dist.all_reduce(result)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"ranks_sum": float(result)}, handle)
    end_process_group(model)
