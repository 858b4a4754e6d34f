"""Starting and ending a group of processes (training, tests, benchmarks, calibration): a free port, a spawn that
returns what rank 0 wrote, and the teardown every rank runs last.

Entry points: free_port(), spawn_collect(function, processes, *arguments), end_process_group(*models).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_collect(function: Callable[..., None], processes: int, *arguments: Any) -> Any:
    """Run function(rank, processes, port, *arguments, out_path) in `processes` processes; return the JSON that
    rank 0 wrote to out_path."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "result.json")
        mp.spawn(function, args=(processes, free_port(), *arguments, out), nprocs=processes, join=True)
        with open(out) as handle:
            return json.load(handle)


def end_process_group(*models: nn.Module, wait_for_peers: bool = True) -> None:
    """Tear down so that no collective is in flight and no gloo thread outlives the interpreter's shutdown.

    gloo's worker threads keep each finished operation (and its tensors) a moment after wait() returns; when the
    last reference to such a tensor drops during interpreter shutdown, the thread blocks on the GIL, Python ends it
    with pthread_exit, and the process dies with SIGABRT ("terminate called without an active exception"). So:
    finish every model's overlapped collectives (prefetched gathers, gradient buckets), meet every rank at a
    barrier, destroy the groups (which waits for pending work and shuts the backends down), then collect garbage
    while the interpreter is whole. wait_for_peers=False (after an error on this rank alone) skips the barrier,
    which peers busy elsewhere would never reach: they see this rank leave instead."""
    if not dist.is_initialized():
        return
    for model in models:
        schedule = getattr(model, "comm_schedule", None)
        if schedule is not None:
            schedule.finish()
    try:
        if wait_for_peers:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()
