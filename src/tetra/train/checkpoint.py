"""Reading training checkpoints: which ones a run has, whether each is whole, and restoring one.

Entry points: list_checkpoints, newest_sound_checkpoint, checkpoint_problems, load_checkpoint (checkpoint_write.py
writes them). A checkpoint folder is also a tetra model checkpoint, so `tetra generate` and `tetra convert to-hf`
accept it directly. A 4D-parallel run writes its weights and optimizer state sharded (torch.distributed.checkpoint,
under shards/); any checkpoint loads into any grid or into a single process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tetra.adapters.lora import has_lora
from tetra.adapters.peft_io import load_adapter_weights_into
from tetra.errors import CheckpointError, TetraError
from tetra.files import read_json
from tetra.integrity import MANIFEST, check_manifest, has_manifest
from tetra.model import Transformer
from tetra.model.io import check_tensors, load_weights_into, read_model_tensors
from tetra.model.safetensors_io import read_tensors
from tetra.model.sharded_io import has_shards, read_sharded_tensors, sharded_metadata
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout, shard
from tetra.parallel.zero import set_optimizer_state
from tetra.train.checkpoint_write import TRAINER_STATE, list_checkpoints
from tetra.train.sharded_checkpoint import check_state_shape, load_shards, state_layout
from tetra.train.torch_strategies import is_dtensor, piece_of


def _piece(full: torch.Tensor, parameter: torch.Tensor, grid: ProcessGrid | None,
           layout: Layout | None = None) -> torch.Tensor:
    """This rank's piece of a full tensor saved for `parameter` (layout: the tensor's own, when it is optimizer
    state not shaped like the parameter)."""
    dtensor_piece = piece_of(full, parameter)  # FSDP2
    if dtensor_piece is not None:
        return dtensor_piece
    layout = layout or getattr(parameter, "tetra_layout", None)
    if grid is None or layout is None or full.dim() == 0:
        return full
    return shard(full, layout, grid)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def checkpoint_problems(folder: Path, hashes: bool = True) -> list[str]:
    """Why a checkpoint cannot be trusted (empty when it can): files missing, resized or (hashes) altered against
    its manifest. A checkpoint written before manifests existed is checked for its loop state only."""
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not (folder / TRAINER_STATE).is_file():
        return [f"{folder / TRAINER_STATE} is missing: this is not a complete training checkpoint"]
    if has_manifest(folder):
        return check_manifest(folder, hashes)
    try:
        written_with_manifests = read_json(folder / TRAINER_STATE, "loop state").get("checkpoint_format", 1) >= 2
    except (TetraError, AttributeError):
        return [f"{folder / TRAINER_STATE} is unreadable"]
    return [f"{folder / MANIFEST} is missing (the save did not finish)"] if written_with_manifests else []


def newest_sound_checkpoint(run_dir: Path, hashes: bool = True) -> tuple[Path | None, dict[Path, list[str]]]:
    """The newest checkpoint that passes its manifest, and the newer ones passed over with their problems."""
    skipped: dict[Path, list[str]] = {}
    for folder in reversed(list_checkpoints(run_dir)):
        problems = checkpoint_problems(folder, hashes)
        if not problems:
            return folder, skipped
        skipped[folder] = problems
    return None, skipped


def _full_shapes(model: Transformer) -> dict[str, torch.Size]:
    return {name: torch.Size(p.tetra_layout.full_shape) if hasattr(p, "tetra_layout") else p.shape
            for name, p in model.named_parameters()}


def _check_sharded_shapes(folder: Path, model: Transformer) -> None:
    """Refuse a sharded checkpoint of another shape before any rank starts reading it."""
    found = {name.removeprefix("model/"): torch.empty(tuple(item.size), device="meta")
             for name, item in sharded_metadata(folder).items() if name.startswith("model/")}
    check_tensors(_full_shapes(model), found, folder)


def _load_weights(model: Transformer, folder: Path, grid: ProcessGrid | None) -> None:
    """Full weights (safetensors or shards) into a single model, or cut into this rank's pieces."""
    if has_lora(model):  # the base came from init.checkpoint; the checkpoint holds the adapters
        load_adapter_weights_into(model, folder, cut=lambda full, parameter: _piece(full, parameter, grid))
        return
    if grid is None and not any(is_dtensor(parameter) for parameter in model.parameters()):  # FSDP2: pieces
        load_weights_into(model, folder)
        return
    tensors = read_model_tensors(folder)
    parameters = dict(model.named_parameters())
    check_tensors(_full_shapes(model), tensors, folder)
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
    sharded = has_shards(folder) and not (folder / "model.safetensors").is_file()
    if sharded and grid is not None:
        _check_sharded_shapes(folder, model)
        load_shards(folder, model, optimizer, grid)
    else:
        _load_weights(model, folder, grid)
        optimizer_tensors = read_sharded_tensors(folder, "optim/") if sharded else read_tensors(folder, "optimizer")
        _load_optimizer(optimizer_tensors, model, optimizer, folder, grid)
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
        check_state_shape(folder, key, tuple(value.shape), optimizer, parameters[key.rsplit("/", 1)[0]])
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        parameter = parameters[name]
        # fused AdamW keeps "step" on the parameter's device too
        set_optimizer_state(optimizer, parameter, field,
                            _piece(value, parameter, grid, state_layout(optimizer, parameter, field)))
