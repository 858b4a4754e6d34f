"""When the loop saves, and whether it waits: a synchronous save returns once the checkpoint is published; an
asynchronous one (run.async_checkpoint) takes a snapshot in memory, runs every collective, and leaves the file work
to one background thread, so the step waits only for the snapshot.

Entry point: Checkpointer(target, model, optimizer, grid, replicated, asynchronous); save(step, state), wait().
At most one save is in flight: the next one (and the end of the run) waits for it, and an error in the
background is raised there.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tetra.model import Transformer
from tetra.parallel.grid import ProcessGrid
from tetra.train.checkpoint_write import (
    CheckpointTarget,
    Write,
    checkpoint_folder,
    stage_checkpoint,
    stage_replicated_checkpoint,
)


class _Background:
    """One write running in a thread; the exception it raised, if any, is kept for the caller."""

    def __init__(self, write: Write) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(write,), name="tetra-checkpoint", daemon=True)
        self.thread.start()

    def _run(self, write: Write) -> None:
        try:
            write()
        except BaseException as error:  # re-raised in the training thread by join()
            self.error = error

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


class Checkpointer:
    """Saves of one run. replicated: DDP, FSDP2 or LoRA on a grid (full tensors, rank 0 writes); otherwise one
    process or the 4D grid's shards."""

    def __init__(self, target: CheckpointTarget, model: Transformer, optimizer: torch.optim.Optimizer,
                 grid: ProcessGrid | None, replicated: bool, asynchronous: bool) -> None:
        self.target, self.model, self.optimizer, self.grid = target, model, optimizer, grid
        self.replicated, self.asynchronous = replicated, asynchronous
        self._pending: _Background | None = None
        self._group: Any = None  # the background write's own process group: its collectives never meet the step's

    def _write_group(self) -> Any:
        if self._group is None and self.asynchronous and self.grid is not None and not self.replicated:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def save(self, step: int, state: dict[str, Any], wait: bool = False) -> Path:
        """Collective under a grid. Returns the folder the checkpoint is (or will be) published as."""
        self.wait()
        copy = self.asynchronous and not wait
        if self.replicated:
            write = stage_replicated_checkpoint(self.target, step, self.model, self.optimizer, state,
                                                self.grid, copy)
        else:
            group = self._write_group() if copy else None
            write = stage_checkpoint(self.target, step, self.model, self.optimizer, state, self.grid, copy, group)
        if write is not None:
            if copy:
                self._pending = _Background(write)
            else:
                write()
        if not copy and self.grid is not None:
            dist.barrier()  # published for every rank when save returns
        return checkpoint_folder(self.target.run_dir, step)

    @property
    def writing(self) -> bool:
        """Whether a background save is still being written."""
        return self._pending is not None and self._pending.thread.is_alive()

    def wait(self) -> None:
        """Until the save in flight (if any) is published; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
