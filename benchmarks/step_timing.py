"""Shared by the multi-process benchmarks: one training step through tetra's Replica (the trainer's step), timed,
and the bytes of training state a rank holds.

Entry points: time_steps(model, replica, optimizer, batches, steps), state_bytes(model, optimizer), peak_rss_mb().
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
import torch.distributed as dist

from tetra.config import GoldfishConfig
from tetra.train.replica import Replica


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Parameters, gradients and optimizer state held by this rank (DTensors: the local shard)."""
    total = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    total += sum(_local(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        total += sum(_local(v).numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(model: torch.nn.Module, replica: Replica, optimizer, batches: list[torch.Tensor], steps: int,
               warmup: int = 2) -> tuple[float, int]:
    """Median seconds per optimizer step after `warmup` steps, and state bytes after the last step's backward."""
    times, held = [], 0
    for step in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        replica.accumulate(model, batches, GoldfishConfig())
        replica.finish_backward(getattr(model, "module", model), 1.0, optimizer)
        held = state_bytes(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), held
