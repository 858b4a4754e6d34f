"""Reading torch.distributed.checkpoint (DCP) folders as full tensors in one process, without a process group.

Entry points: has_shards(folder) and read_sharded_tensors(folder, prefix).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from tetra.errors import CheckpointError

SHARDS = "shards"


def has_shards(folder: Path) -> bool:
    return (folder / SHARDS / ".metadata").is_file()


def sharded_metadata(folder: Path) -> dict[str, Any]:
    """Name -> size and dtype (TensorStorageMetadata) of every tensor in the DCP folder."""
    # Imported here: torch.distributed.checkpoint costs over a second at start-up, and most commands never need it.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(folder / SHARDS)).read_metadata()
    except Exception as error:  # DCP raises several types for damaged metadata
        raise CheckpointError(f"{folder / SHARDS} is not a readable sharded checkpoint ({error}).") from None
    return {name: item for name, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def load_in_one_process(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Fill `state` (full-size tensors by DCP name) from folder/shards, without a process group."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # reading in one process is the intent, not an accident
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder / SHARDS), no_dist=True)


def read_sharded_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with prefix, at full size (the prefix removed from the names)."""

    wanted = {name: item for name, item in sharded_metadata(folder).items() if name.startswith(prefix)}
    state = {name: torch.zeros(tuple(item.size), dtype=item.properties.dtype) for name, item in wanted.items()}
    try:
        load_in_one_process(state, folder)
    except Exception as error:
        raise CheckpointError(f"Reading {folder / SHARDS} failed ({error}); a shard file may be missing.") from None
    return {name.removeprefix(prefix): value for name, value in state.items()}
