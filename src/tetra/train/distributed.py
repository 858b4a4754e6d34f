"""Joining a launch (torchrun, or srun with one task per rank): the process group (NCCL on GPUs, gloo on CPUs),
this rank's device, and the grid.

Entry points: start_distributed(config) -> (grid or None, device) and stop_distributed().
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tetra.config import ParallelConfig, RunConfig
from tetra.devices import resolve_device
from tetra.errors import ConfigError
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.launch import end_process_group


@dataclass(frozen=True)
class Launch:
    """Where this process stands in its launch: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or, started by Slurm's
    srun with one task per rank (no torchrun in between), SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID. Under
    srun each rank receives Slurm's SIGTERM itself, so a preempted job's every process exits 0."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Launch:
        if "WORLD_SIZE" in environ or int(environ.get("SLURM_STEP_NUM_TASKS", "1")) < 2:
            return cls(int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1")),
                       int(environ.get("LOCAL_RANK", "0")))
        return cls(int(environ["SLURM_PROCID"]), int(environ["SLURM_STEP_NUM_TASKS"]),
                   int(environ.get("SLURM_LOCALID", "0")))


def launched_world_size() -> int:
    """Processes in this launch; 1 when run directly."""
    return Launch.from_environment().world


def start_distributed(config: RunConfig) -> tuple[ProcessGrid | None, torch.device]:
    """None for a plain single-process run; otherwise the grid over every launched process."""
    return start_grid(config.parallel, resolve_device(config.run.device))


def start_grid(parallel: ParallelConfig, device: torch.device) -> tuple[ProcessGrid | None, torch.device]:
    """The grid of these sizes over every launched process (None for one plain process), its process group started
    (NCCL on GPUs, gloo on CPUs), and this rank's device."""
    launch = Launch.from_environment()
    world = launch.world
    wants_grid = world > 1 or any(getattr(parallel, name) > 1 for name in ("data", "depth", "row", "col"))
    if not wants_grid:
        return None, device
    shape = GridShape.infer(world, parallel.data, parallel.depth, parallel.row, parallel.col)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world > 1 and "MASTER_ADDR" not in os.environ:
            raise ConfigError(f"This is one of {world} launched processes, but MASTER_ADDR is not set: launch with "
                              "torchrun (torchrun --nproc-per-node N -m tetra train CONFIG ...), or under srun "
                              "export MASTER_ADDR (the first node) and MASTER_PORT in the batch script.")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = timedelta(minutes=30)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank, world_size=world,
                                timeout=timeout, store=_attempt_store(launch, timeout))
    return ProcessGrid.build(shape), device


def _attempt_store(launch: Launch, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, its store with this attempt's keys kept apart from earlier attempts' (None elsewhere: the
    usual env:// rendezvous).

    torchrun keeps one store for the whole job and hands it to every restarted group unprefixed, so after a rank
    dies the new processes can read the dead ones' addresses, left under the same keys, and fail to connect
    ("Connection refused"), more often the more ranks there are. A prefix per restart gives each attempt fresh
    keys."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=launch.world,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"tetra/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def stop_distributed(succeeded: bool = True) -> None:
    """After a run: a clean teardown when every rank finished; after an error, leave without waiting for peers."""
    end_process_group(wait_for_peers=succeeded)


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def agree_on_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag set if it is set on any rank (one all-reduce), so every rank takes the same branch."""
    if not dist.is_initialized():
        return list(flags)
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]
