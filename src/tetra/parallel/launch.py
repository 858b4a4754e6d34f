"""Starting a local group of processes (tests, benchmarks, calibration): a free port and a spawn that returns what
rank 0 wrote.

Entry points: free_port() and spawn_collect(function, processes, *arguments).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


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
