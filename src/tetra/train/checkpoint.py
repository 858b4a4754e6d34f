"""Training checkpoints: model, optimizer, RNG and loop state written atomically; resume; keep the newest K.

Entry points: save_checkpoint, load_checkpoint, latest_checkpoint. A checkpoint folder is also a tetra model
checkpoint, so `tetra generate` and `tetra convert to-hf` accept it directly. Under a 4D grid every tensor is
gathered to its full shape and rank 0 writes it, so a checkpoint loads into any other grid or a single process.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from tetra.errors import CheckpointError
from tetra.files import atomic_directory, read_json, write_json
from tetra.model import Transformer
from tetra.model.io import check_tensors, load_weights_into, write_model_files
from tetra.model.safetensors_io import read_tensors, write_tensors
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import shard, unshard
from tetra.train.distributed import is_main_rank

STEP_FOLDER = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def _full(value: torch.Tensor, parameter: torch.Tensor, grid: ProcessGrid | None) -> torch.Tensor:
    """A parameter-shaped tensor (the parameter, or optimizer state like it) gathered to its full shape."""
    layout = getattr(parameter, "tetra_layout", None)
    if grid is None or layout is None or value.shape != parameter.shape:
        return value.detach()
    return unshard(value.detach(), layout, grid)


def _piece(full: torch.Tensor, parameter: torch.Tensor, grid: ProcessGrid | None) -> torch.Tensor:
    """This rank's piece of a full tensor saved for `parameter`."""
    layout = getattr(parameter, "tetra_layout", None)
    if grid is None or layout is None or full.dim() == 0:
        return full
    return shard(full, layout, grid)


def _optimizer_tensors(model: Transformer, optimizer: torch.optim.Optimizer,
                       grid: ProcessGrid | None) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name (readable, and independent of parameter order and grid)."""
    tensors = {}
    for name, parameter in model.named_parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}/{key}"] = _full(value, parameter, grid)
    return tensors


def _model_tensors(model: Transformer, grid: ProcessGrid | None) -> dict[str, torch.Tensor]:
    return {name: _full(p, p, grid) for name, p in model.named_parameters()}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], config_toml: str, tokenizer_from: Path | None, keep: int,
                    grid: ProcessGrid | None = None) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep` checkpoints.

    Collective under a grid: every rank gathers, rank 0 writes, and all wait until the folder exists."""
    folder = checkpoint_folder(run_dir, step)
    weights = _model_tensors(model, grid)
    optimizer_state = _optimizer_tensors(model, optimizer, grid)
    if is_main_rank():
        with atomic_directory(folder, overwrite=True) as staging:
            write_model_files(model, staging, tokenizer_from, state=weights)
            write_tensors(optimizer_state, staging, stem="optimizer")
            write_tensors(_rng_tensors(), staging, stem="rng")
            write_json(staging / TRAINER_STATE, {"step": step, **state})
            (staging / "config.toml").write_text(config_toml, encoding="utf-8")
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if grid is not None:
        torch.distributed.barrier()
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (staging folders are hidden and never listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(match[1]), path) for path in root.iterdir()
             if (match := STEP_FOLDER.match(path.name)) and (path / TRAINER_STATE).is_file()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _load_weights(model: Transformer, folder: Path, grid: ProcessGrid | None) -> None:
    if grid is None:
        load_weights_into(model, folder)
        return
    tensors = read_tensors(folder)
    parameters = dict(model.named_parameters())
    full_shapes = {name: torch.Size(p.tetra_layout.full_shape) if hasattr(p, "tetra_layout")
                   else p.shape for name, p in parameters.items()}
    check_tensors(full_shapes, tensors, folder)
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(_piece(tensors[name], parameter, grid))


def load_checkpoint(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                    grid: ProcessGrid | None = None) -> dict[str, Any]:
    """Restore model weights, optimizer state and RNG; return the loop state (step, data position, ...).
    The checkpoint may come from any grid: full tensors are cut to this rank's pieces."""
    if not (folder / TRAINER_STATE).is_file():
        raise CheckpointError(f"{folder} is not a training checkpoint (no {TRAINER_STATE}). Pass a folder like "
                              "RUN/checkpoints/step-0001000, or --resume auto.")
    _load_weights(model, folder, grid)
    _load_optimizer(read_tensors(folder, "optimizer"), model, optimizer, folder, grid)
    rng = read_tensors(folder, "rng")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[key] for key in sorted(k for k in rng if k.startswith("cuda_"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return read_json(folder / TRAINER_STATE, "training loop state")


def _load_optimizer(tensors: dict[str, torch.Tensor], model: Transformer, optimizer: torch.optim.Optimizer,
                    folder: Path, grid: ProcessGrid | None) -> None:
    parameters = dict(model.named_parameters())
    unknown = sorted({key.rsplit("/", 1)[0] for key in tensors} - set(parameters))
    if unknown:
        raise CheckpointError(f"The optimizer state in {folder} belongs to parameters this model lacks: "
                              f"{', '.join(unknown[:6])}. Resume with the configuration the run was started with.")
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        parameter = parameters[name]
        value = _piece(value, parameter, grid)
        optimizer.state[parameter][field] = value.to(parameter.device)  # fused AdamW keeps "step" there too
