"""Training checkpoints: model, optimizer, RNG and loop state written atomically; resume; keep the newest K.

Entry points: save_checkpoint, load_checkpoint, latest_checkpoint. A checkpoint folder is also a tetra model
checkpoint, so `tetra generate` and `tetra convert to-hf` accept it directly. A 4D-parallel run writes its weights
and optimizer state sharded (torch.distributed.checkpoint, under shards/); any checkpoint loads into any grid or
into a single process.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from tetra.adapters.lora import has_lora
from tetra.adapters.peft_io import load_adapter_weights_into, save_peft_adapter
from tetra.errors import CheckpointError
from tetra.files import atomic_directory, read_json, write_json
from tetra.model import Transformer
from tetra.model.io import (
    check_tensors,
    load_weights_into,
    model_tensors_for_saving,
    read_model_tensors,
    write_model_files,
)
from tetra.model.safetensors_io import read_tensors, write_tensors
from tetra.model.sharded_io import has_shards, read_sharded_tensors, sharded_metadata
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import shard, unshard
from tetra.parallel.zero import set_optimizer_state
from tetra.train.distributed import is_main_rank
from tetra.train.sharded_checkpoint import load_shards, save_shards
from tetra.train.torch_strategies import full_tensor, is_dtensor, piece_of

STEP_FOLDER = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def _piece(full: torch.Tensor, parameter: torch.Tensor, grid: ProcessGrid | None) -> torch.Tensor:
    """This rank's piece of a full tensor saved for `parameter`."""
    dtensor_piece = piece_of(full, parameter)  # FSDP2
    if dtensor_piece is not None:
        return dtensor_piece
    layout = getattr(parameter, "tetra_layout", None)
    if grid is None or layout is None or full.dim() == 0:
        return full
    return shard(full, layout, grid)


def _optimizer_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name (readable, and independent of parameter order)."""
    tensors = {}
    for name, parameter in model.named_parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            tensors[f"{name}/{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach()
    return tensors


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], config_toml: str, tokenizer_from: Path | None, keep: int,
                    grid: ProcessGrid | None = None) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep` checkpoints.

    Collective under a grid: every rank writes its shards, rank 0 the rest, and the folder appears complete."""
    folder = checkpoint_folder(run_dir, step)
    if grid is None:
        with atomic_directory(folder, overwrite=True) as staging:
            _write_weights(model, staging, tokenizer_from)
            write_tensors(_optimizer_tensors(model, optimizer), staging, stem="optimizer")
            _write_loop_files(staging, step, state, config_toml)
    else:
        _save_grid_checkpoint(folder, step, model, optimizer, state, config_toml, tokenizer_from, grid)
    if is_main_rank():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if grid is not None:
        torch.distributed.barrier()
    return folder


def save_replicated_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                               state: dict[str, Any], config_toml: str, tokenizer_from: Path | None,
                               keep: int, grid: ProcessGrid | None = None) -> Path:
    """DDP or FSDP2: every rank assembles the full tensors (a collective for FSDP2's DTensors) and rank 0 writes
    them in the single-process format, which any grid or strategy can resume from. LoRA on the 4D grid (grid
    given) takes this path too: only the small adapters and their optimizer state are gathered."""
    parameters = dict(model.named_parameters())

    def whole(name: str, value: torch.Tensor) -> torch.Tensor:
        layout = getattr(parameters.get(name), "tetra_layout", None)
        if grid is None or layout is None or value.dim() == 0:
            return full_tensor(value.detach())
        return unshard(value.detach(), layout, grid)

    saved = _adapter_tensors(model) if has_lora(model) else model_tensors_for_saving(model)
    weights = {name: whole(name, value) for name, value in saved.items()}
    optimizer_tensors = {key: whole(key.rsplit("/", 1)[0], value)
                         for key, value in _optimizer_tensors(model, optimizer).items()}
    folder = checkpoint_folder(run_dir, step)
    if is_main_rank():
        with atomic_directory(folder, overwrite=True) as staging:
            _write_weights(model, staging, tokenizer_from, weights)
            write_tensors(optimizer_tensors, staging, stem="optimizer")
            _write_loop_files(staging, step, state, config_toml)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return folder


def _adapter_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the trainable tensors (adapters and new token rows), by parameter name."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def _write_weights(model: Transformer, folder: Path, tokenizer_from: Path | None,
                   weights: dict[str, torch.Tensor] | None = None) -> None:
    """The model's weights; with LoRA, only the adapters (PEFT's format) beside the config, since the base is
    unchanged and stays where init.checkpoint points. `weights`: full tensors gathered from a parallel model."""
    if has_lora(model):
        write_model_files(model, folder, tokenizer_from, weights=False)
        save_peft_adapter(model, folder, model.lora_config, model.lora_base, weights)
    else:
        write_model_files(model, folder, tokenizer_from, state=weights)


def _write_loop_files(folder: Path, step: int, state: dict[str, Any], config_toml: str) -> None:
    write_tensors(_rng_tensors(), folder, stem="rng")
    write_json(folder / TRAINER_STATE, {"step": step, **state})
    (folder / "config.toml").write_text(config_toml, encoding="utf-8")


def _save_grid_checkpoint(folder: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                          state: dict[str, Any], config_toml: str, tokenizer_from: Path | None,
                          grid: ProcessGrid) -> None:
    """Shards from every rank into a hidden staging folder, which rank 0 completes and renames into place."""
    staging = folder.with_name(f".{folder.name}.staging")
    if is_main_rank():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    save_shards(staging, model, optimizer, grid)
    torch.distributed.barrier()
    if is_main_rank():
        write_model_files(model, staging, tokenizer_from, weights=False)
        _write_loop_files(staging, step, state, config_toml)
        if folder.exists():
            retired = folder.with_name(f".{folder.name}.retired")
            folder.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        staging.rename(folder)


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
        name, field = key.rsplit("/", 1)
        parameter = parameters[name]
        # fused AdamW keeps "step" on the parameter's device too
        set_optimizer_state(optimizer, parameter, field, _piece(value, parameter, grid))
