"""Reading and writing tensors as safetensors files, single or sharded with an index (never pickle).

Entry points: read_tensors(folder, stem) and write_tensors(tensors, folder, stem, max_shard_bytes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tetra.errors import CheckpointError
from tetra.files import read_json, write_json


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}). It may be truncated or "
                              "corrupt: copy it again from its source.") from None


def read_tensors(folder: Path, stem: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of `stem.safetensors`, or of the shards listed in `stem.safetensors.index.json`."""
    single = folder / f"{stem}.safetensors"
    index_path = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return _load(single)
    if index_path.is_file():
        index = read_json(index_path, "the safetensors shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no 'weight_map'; it is not a safetensors index.")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index_path} lists the shard {shard}, which is missing from {folder}.")
            tensors.update(_load(folder / shard))
        return tensors
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f" It holds {', '.join(found)}: tetra never unpickles weights; re-save them as safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True)).") if found else ""
    raise CheckpointError(f"{folder} has no {single.name} and no {index_path.name}.{hint}")


def write_tensors(tensors: dict[str, torch.Tensor], folder: Path, stem: str = "model",
                  max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write tensors, split into shards of at most max_shard_bytes (plus an index) when they do not fit in one."""
    tensors = {name: value.detach().contiguous().cpu() for name, value in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
    if len(shards) == 1:
        path = folder / f"{stem}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        path = folder / f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, path.name))
        paths.append(path)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths


