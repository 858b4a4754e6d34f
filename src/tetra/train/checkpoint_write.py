"""Writing training checkpoints in two phases: `stage_*` captures what the checkpoint holds (and runs every
collective), the returned `write()` does the file work, so it can run in a background thread.

Entry points: stage_checkpoint (one process, or a 4D grid's shards), stage_replicated_checkpoint (DDP, FSDP2,
LoRA on a grid), checkpoint_folder, list_checkpoints. A save is atomic: files go to a hidden staging folder, a
manifest with each file's size and SHA-256 is written last, then one rename publishes step-N. Old checkpoints are
renamed away before they are deleted, so a kill at any point leaves every published checkpoint whole.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tetra.adapters.lora import has_lora
from tetra.adapters.peft_io import save_peft_adapter
from tetra.files import write_json
from tetra.integrity import write_manifest
from tetra.model import Transformer
from tetra.model.io import model_tensors_for_saving, write_model_files
from tetra.model.safetensors_io import write_tensors
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import unshard
from tetra.train.distributed import is_main_rank
from tetra.train.sharded_checkpoint import shard_state, state_layout
from tetra.train.torch_strategies import full_tensor

TRAINER_STATE = "trainer_state.json"
STEP_FOLDER = re.compile(r"^step-(\d+)$")
MANIFEST_FORMAT = 2  # trainer_state.json's checkpoint_format from which a manifest must be present
Write = Callable[[], Path]


@dataclass(frozen=True)
class CheckpointTarget:
    """What stays the same for every checkpoint of a run."""

    run_dir: Path
    config_toml: str
    tokenizer_from: Path | None
    keep: int


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (staging folders are hidden and never listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(match[1]), path) for path in root.iterdir()
             if (match := STEP_FOLDER.match(path.name)) and (path / TRAINER_STATE).is_file()]
    return [path for _, path in sorted(found)]


def optimizer_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
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


def _to_host(tensors: dict[str, torch.Tensor], copy: bool) -> dict[str, torch.Tensor]:
    """A snapshot the training step cannot change (copy, for a background write), or the tensors themselves."""
    return {name: value.detach().to("cpu", copy=copy) for name, value in tensors.items()}


def _adapter_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the trainable tensors (adapters and new token rows), by parameter name."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def _write_weights(model: Transformer, folder: Path, tokenizer_from: Path | None,
                   weights: dict[str, torch.Tensor]) -> None:
    """The model's weights; with LoRA, only the adapters (PEFT's format) beside the config, since the base is
    unchanged and stays where init.checkpoint points."""
    if has_lora(model):
        write_model_files(model, folder, tokenizer_from, weights=False)
        save_peft_adapter(model, folder, model.lora_config, model.lora_base, weights)
    else:
        write_model_files(model, folder, tokenizer_from, state=weights)


def _write_loop_files(folder: Path, step: int, state: dict[str, Any], config_toml: str,
                      rng: dict[str, torch.Tensor]) -> None:
    write_tensors(rng, folder, stem="rng")
    write_json(folder / TRAINER_STATE, {"step": step, "checkpoint_format": MANIFEST_FORMAT, **state})
    (folder / "config.toml").write_text(config_toml, encoding="utf-8")


def _staging_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.staging")


@contextlib.contextmanager
def _removed_on_error(staging: Path) -> Iterator[None]:
    """A failed save (disk full, ...) leaves nothing behind; the published checkpoints are untouched."""
    try:
        yield
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _retire(folder: Path) -> None:
    """Take a folder out of the listing with one rename, then delete it: a kill midway leaves only a hidden
    remnant, never a half-deleted step-N that looks like a checkpoint."""
    if not folder.exists():
        return
    retired = folder.with_name(f".{folder.name}.retired")
    shutil.rmtree(retired, ignore_errors=True)
    folder.rename(retired)
    shutil.rmtree(retired, ignore_errors=True)


def _publish(staging: Path, folder: Path, keep: int) -> Path:
    """Manifest last, then the rename that makes the checkpoint visible; then drop all but the newest `keep`."""
    write_manifest(staging)
    _retire(folder)
    staging.rename(folder)
    for old in list_checkpoints(folder.parent.parent)[:-keep]:
        _retire(old)
    return folder


def _single_writer(target: CheckpointTarget, step: int, model: Transformer, state: dict[str, Any],
                   weights: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
                   rng: dict[str, torch.Tensor]) -> Write:
    folder = checkpoint_folder(target.run_dir, step)

    def write() -> Path:
        staging = _staging_folder(folder)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with _removed_on_error(staging):
            _write_weights(model, staging, target.tokenizer_from, weights)
            write_tensors(optim, staging, stem="optimizer")
            _write_loop_files(staging, step, state, target.config_toml, rng)
            return _publish(staging, folder, target.keep)

    return write


def stage_checkpoint(target: CheckpointTarget, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any], grid: ProcessGrid | None = None, copy: bool = False,
                     group: Any = None) -> Write:
    """One process: the single-file format. A 4D grid: every rank's shards (collective when written; `group` is
    the process group the write's collectives use, a separate one when the write runs in the background)."""
    if grid is not None:
        return _stage_shards(target, step, model, optimizer, state, grid, copy, group)
    weights = _adapter_tensors(model) if has_lora(model) else model_tensors_for_saving(model)
    return _single_writer(target, step, model, state, _to_host(weights, copy),
                          _to_host(optimizer_tensors(model, optimizer), copy), _rng_tensors())


def stage_replicated_checkpoint(target: CheckpointTarget, step: int, model: Transformer,
                                optimizer: torch.optim.Optimizer, state: dict[str, Any],
                                grid: ProcessGrid | None = None, copy: bool = False) -> Write | None:
    """DDP or FSDP2 (collective): every rank assembles the full tensors (FSDP2's DTensors) and rank 0 writes them
    in the single-process format, which any grid or strategy can resume from; other ranks get None. LoRA on the
    4D grid (grid given) takes this path too: only the small adapters and their optimizer state are gathered."""
    parameters = dict(model.named_parameters())

    def whole(name: str, value: torch.Tensor, field: str | None = None) -> torch.Tensor:
        parameter = parameters.get(name)
        layout = getattr(parameter, "tetra_layout", None) if field is None else \
            state_layout(optimizer, parameter, field)
        if grid is None or layout is None or value.dim() == 0:
            return full_tensor(value.detach())
        return unshard(value.detach(), layout, grid)

    saved = _adapter_tensors(model) if has_lora(model) else model_tensors_for_saving(model)
    weights = {name: whole(name, value) for name, value in saved.items()}
    optim = {key: whole(key.rsplit("/", 1)[0], value, key.rsplit("/", 1)[1])
             for key, value in optimizer_tensors(model, optimizer).items()}
    if not is_main_rank():
        return None
    return _single_writer(target, step, model, state, _to_host(weights, copy), _to_host(optim, copy), _rng_tensors())


def _stage_shards(target: CheckpointTarget, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                  state: dict[str, Any], grid: ProcessGrid, copy: bool, group: Any) -> Write:
    """Each rank's [row, col] blocks into a staging folder rank 0 has made; rank 0 completes and publishes it once
    the shard write returns there (torch.distributed.checkpoint's coordinator returns after every rank's files are
    written)."""
    import torch.distributed.checkpoint as dcp

    folder = checkpoint_folder(target.run_dir, step)
    staging = _staging_folder(folder)
    if is_main_rank():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    shards = shard_state(model, optimizer, grid, copy)
    rng = _rng_tensors()

    def write() -> Path:
        from tetra.model.sharded_io import SHARDS

        dcp.save(shards, checkpoint_id=str(staging / SHARDS), process_group=group)
        if not is_main_rank():
            return folder
        with _removed_on_error(staging):
            write_model_files(model, staging, target.tokenizer_from, weights=False)
            _write_loop_files(staging, step, state, target.config_toml, rng)
            return _publish(staging, folder, target.keep)

    return write
