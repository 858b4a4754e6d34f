"""When a run runs out of memory: say so in one paragraph, with how much this grid needs per process (the
planner's memory model), how much a process has, and the smallest grid the planner finds that fits, instead of an
allocator's traceback.

Entry points: is_out_of_memory(error), data_bytes(), out_of_memory_error(config, explicit_model, device, world)
-> ResourceError.
"""

from __future__ import annotations

import re
import resource
from typing import Any

import torch

from tetra.config import RunConfig, recomputed_part
from tetra.errors import ResourceError, TetraError
from tetra.model import ModelConfig
from tetra.parallel.grid import GridShape
from tetra.parallel.planner import MachineProfile, plan, predict

GIB = 2**30
DEFAULT_MACHINE = "dgx-h100"  # only ranks grids of equal memory by speed; the memory model needs no machine
SIGNS = ("can't allocate memory", "cannot allocate memory", "out of memory", "std::bad_alloc")


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation, whichever layer noticed it (Python, torch's CPU allocator, CUDA)."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(sign in str(error).lower() for sign in SIGNS)


def memory_per_process(device: torch.device) -> int:
    """Bytes one process may use: the GPU's memory, else the data-size limit set on this process (ulimit -d,
    which is what enforced the failure), else the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft != resource.RLIM_INFINITY:
        return soft
    from tetra.infer.context import free_bytes

    return free_bytes(device)


def _model_config(config: RunConfig, explicit_model: dict[str, Any]) -> ModelConfig | None:
    try:
        if config.init.checkpoint:
            from tetra.model.io import read_model_config

            return read_model_config(config.init.checkpoint)
        from tetra.data.shards import PreparedData
        from tetra.train.setup import resolve_model_config

        return resolve_model_config(config, explicit_model, PreparedData.open(config.data.path))
    except TetraError:
        return None


def data_bytes() -> int:
    """What this process already uses before the model exists (the runtime: torch, threads, buffers), the part
    of its memory the planner does not model (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def out_of_memory_error(config: RunConfig, explicit_model: dict[str, Any], device: torch.device,
                        world: int, runtime_bytes: int = 0, cause: BaseException | None = None) -> ResourceError:
    """The paragraph for a run that ran out of memory on `world` processes of `device`; runtime_bytes: what each
    process used before building anything (data_bytes() at the start), taken from what the model may use."""
    model_config = _model_config(config, explicit_model)
    available = memory_per_process(device) - (runtime_bytes if device.type == "cpu" else 0)
    if model_config is None:
        return ResourceError(f"The run ran out of memory on {device} ({available / GIB:.2f} GiB per process). Use "
                             "more processes (torchrun with parallel.auto = true), LoRA or activation checkpointing.")
    parallel = config.parallel
    shape = GridShape.infer(world, parallel.data, parallel.depth, parallel.row, parallel.col)
    global_batch = config.train.batch_size * shape.data * shape.depth
    options = dict(zero1=parallel.zero1, regather=parallel.regather, value_bytes=4 if device.type == "cpu" else 2,
                   recompute=recomputed_part(config.train.activation_checkpointing),
                   finetune="lora" if config.lora.enabled else "full")
    machine = MachineProfile.load(parallel.machine or DEFAULT_MACHINE)
    here = sum(predict(model_config, shape, global_batch, config.data.seq_len, machine, **options).memory.values())
    sizes = f"{model_config.num_parameters() / 1e6:.0f}M parameters"
    message = (f"Out of memory: training {sizes} on {world} process(es) as data {shape.data} x depth {shape.depth} "
               f"x row {shape.row} x col {shape.col} needs about {here / GIB:.2f} GiB per process (weights, "
               f"gradients and AdamW state in fp32, activations: the planner's estimate), but a process here has "
               f"{available / GIB:.2f} GiB on {device}{_failed_allocation(cause)}.")
    suggestion = _smallest_grid_that_fits(model_config, global_batch, config, machine, options, available, world)
    if suggestion is None:
        return ResourceError(message + " No grid of up to 4096 processes fits this batch; lower train.batch_size "
                             "or data.seq_len, or fine-tune with LoRA (lora.enabled = true).")
    (count, best), needed = suggestion, sum(suggestion[1].memory.values())
    grid = best.shape
    return ResourceError(
        message + f" The planner's smallest grid that fits is {count} processes as data {grid.data} x depth "
        f"{grid.depth} x row {grid.row} x col {grid.col} (about {needed / GIB:.2f} GiB each): torchrun "
        f"--nproc-per-node {count} -m tetra train CONFIG parallel.data={grid.data} parallel.depth={grid.depth} "
        f"parallel.row={grid.row} parallel.col={grid.col} (or parallel.auto = true), with train.batch_size = "
        f"{global_batch // (grid.data * grid.depth)}. `tetra plan` shows the alternatives; LoRA and "
        "activation checkpointing need less.")


def _failed_allocation(cause: BaseException | None) -> str:
    """', where allocating N bytes failed' from torch's CPU allocator message (nothing when it says no size)."""
    match = re.search(r"allocate (\d+) bytes", str(cause or ""))
    return f", where allocating {int(match[1]) / 2**20:.1f} MiB failed" if match else ""


def _smallest_grid_that_fits(model_config: ModelConfig, global_batch: int, config: RunConfig,
                             machine: MachineProfile, options: dict, available: int, world: int):
    count = 2
    while count <= 4096:
        if count > world:
            try:
                ranked = plan(model_config, count, global_batch, config.data.seq_len, machine, **options)
            except TetraError:
                ranked = []
            fitting = [p for p in ranked if sum(p.memory.values()) <= 0.9 * available]
            if fitting:
                return count, fitting[0]
        count *= 2
    return None
