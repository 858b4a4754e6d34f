"""Worker for the overlap tests: train a few steps on a grid with overlapped and with blocking collectives.

Entry point: train_both_ways(rank, world, port, cases, out_path), started by torch.multiprocessing.spawn.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist

from parallel_worker import MODELS, _max_error, _reference_and_parallel
from tetra.config import GoldfishConfig
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.parallelize import full_state_dict, parallelize
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.replica import Replica

GLOBAL_BATCH, SEQ, STEPS, ACCUMULATION = 8, 8, 3, 2


def _adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, eps=1e-3)


def _train(model: torch.nn.Module, grid: ProcessGrid | None, zero1: bool, tokens: torch.Tensor) -> list[float]:
    """STEPS optimizer steps through the trainer's Replica, two micro-batches each; returns the losses."""
    replica = Replica(grid, zero1=zero1)
    optimizer = ZeroOptimizer([{"params": list(model.parameters())}], grid, _adamw) if zero1 else \
        _adamw(model.parameters())
    local = tokens if grid is None else tokens.chunk(grid.size("batch"))[grid.index("batch")]
    losses = []
    for _ in range(STEPS):
        losses.append(replica.accumulate(model, list(local.chunk(ACCUMULATION)), GoldfishConfig()).loss)
        replica.finish_backward(model, 0.5, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _case(model_name: str, shape: GridShape, zero1: bool) -> dict:
    grid = ProcessGrid.build(shape)
    reference, _ = _reference_and_parallel(model_name, grid)
    vocab = MODELS[model_name]["vocab_size"]
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    results = {}
    for overlap in (True, False):
        model = parallelize(copy.deepcopy(reference), grid, overlap=overlap)
        model.comm_schedule.bucket_bytes = 2048  # several buckets per group, even for this small model
        losses = _train(model, grid, zero1, tokens)
        results[overlap] = (losses, full_state_dict(model, grid))
    single_losses = _train(reference, None, False, tokens)
    (on_losses, on_state), (off_losses, off_state) = results[True], results[False]
    return {"model": model_name, "grid": shape.__dict__, "zero1": zero1,
            "identical": on_losses == off_losses and all(torch.equal(on_state[n], off_state[n]) for n in on_state),
            "loss_error": max(abs(a - b) / abs(b) for a, b in zip(on_losses, single_losses, strict=True)),
            "param_error": _max_error(on_state, {n: p.detach() for n, p in reference.named_parameters()})}


def train_both_ways(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [_case(model_name, GridShape(**shape), zero1) for model_name, shape, zero1 in cases]
        if rank == 0:
            with open(out_path, "w") as handle:
                json.dump(results, handle)
    finally:
        dist.destroy_process_group()
