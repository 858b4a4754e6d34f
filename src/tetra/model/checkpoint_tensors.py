"""A tetra checkpoint's tensors by name, read one at a time: names, shapes and dtypes come from the files' headers
(safetensors) or metadata (a parallel run's torch.distributed.checkpoint shards) without reading any data.

Entry point: CheckpointTensors(folder) with .shapes, .dtypes and .read(name).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tetra.errors import CheckpointError
from tetra.files import read_json
from tetra.model.safetensors_stream import DTYPE_CODES
from tetra.model.sharded_io import has_shards, load_in_one_process, sharded_metadata

DTYPES = {code: dtype for dtype, (code, _) in DTYPE_CODES.items()}
PREFIX = "model/"


class CheckpointTensors:
    """Lazy access to model.safetensors (single or indexed shards) or to shards/ of a parallel run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._file_of: dict[str, Path] = {}
        if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file() \
                and has_shards(folder):
            self.sharded = True
            for name, item in sharded_metadata(folder).items():
                if name.startswith(PREFIX):
                    self.shapes[name[len(PREFIX):]] = tuple(item.size)
                    self.dtypes[name[len(PREFIX):]] = item.properties.dtype
            return
        self.sharded = False
        for path in self._files():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        piece = handle.get_slice(name)
                        self.shapes[name], self.dtypes[name] = tuple(piece.get_shape()), DTYPES[piece.get_dtype()]
                        self._file_of[name] = path
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path} is not a readable safetensors file ({error}). It may be truncated "
                                      "or corrupt: copy it again from its source.") from None

    def _files(self) -> list[Path]:
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        index = self.folder / "model.safetensors.index.json"
        if not index.is_file():
            raise CheckpointError(f"{self.folder} has no model.safetensors, no index and no shards/: it holds no "
                                  "model weights.")
        weight_map = read_json(index, "the safetensors shard index").get("weight_map", {})
        return [self.folder / name for name in sorted(set(weight_map.values()))]

    def read(self, name: str) -> torch.Tensor:
        """One full tensor (only its bytes are read)."""
        if self.sharded:
            target = {PREFIX + name: torch.empty(self.shapes[name], dtype=self.dtypes[name])}
            load_in_one_process(target, self.folder)
            return target[PREFIX + name]
        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)
