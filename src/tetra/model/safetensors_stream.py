"""Writing safetensors files one tensor at a time: the header (names, dtypes, shapes, offsets) is known before any
data, so a model larger than memory can be written while holding one tensor. The bytes are those of
safetensors.torch.save_file, and the split into shards and the index are those of safetensors_io.write_tensors, so
a streamed export equals a gathered one byte for byte.

Entry point: write_streamed(planned, produce, folder, stem, max_shard_bytes) with planned = [(name, shape, dtype)].
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from tetra.errors import CheckpointError
from tetra.files import write_json

# safetensors' names for torch dtypes, and its Dtype enum order (a file lists the larger types first).
DTYPE_CODES = {torch.bool: ("BOOL", 0), torch.uint8: ("U8", 4), torch.int8: ("I8", 5),
               torch.float8_e5m2: ("F8_E5M2", 6), torch.float8_e4m3fn: ("F8_E4M3", 7), torch.int16: ("I16", 9),
               torch.float16: ("F16", 11), torch.bfloat16: ("BF16", 12), torch.int32: ("I32", 13),
               torch.float32: ("F32", 15), torch.float64: ("F64", 17), torch.int64: ("I64", 18)}

Planned = tuple[str, tuple[int, ...], torch.dtype]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _write_file(path: Path, planned: list[Planned], produce: Callable[[str], torch.Tensor]) -> None:
    """One safetensors file: header, then each tensor's bytes in the header's order."""
    ordered = sorted(planned, key=lambda item: (-DTYPE_CODES[item[2]][1], item[0]))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in ordered:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_CODES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape, dtype in ordered:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"{name} came out as {tuple(tensor.shape)} {tensor.dtype}, not the planned "
                                      f"{tuple(shape)} {dtype}; the checkpoint's metadata and data disagree.")
            handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_streamed(planned: list[Planned], produce: Callable[[str], torch.Tensor], folder: Path,
                   stem: str = "model", max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Like write_tensors, with each tensor made by produce(name) only when its turn comes."""
    unknown = sorted({str(dtype) for _, _, dtype in planned if dtype not in DTYPE_CODES})
    if unknown:
        raise CheckpointError(f"safetensors cannot hold {', '.join(unknown)}; convert with --dtype float32.")
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in planned:
        nbytes = _nbytes(item[1], item[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    if len(shards) == 1:
        path = folder / f"{stem}.safetensors"
        _write_file(path, shards[0], produce)
        return [path]
    paths, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        path = folder / f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_file(path, shard, produce)
        weight_map.update(dict.fromkeys((name for name, _, _ in shard), path.name))
        paths.append(path)
    total = sum(_nbytes(shape, dtype) for _, shape, dtype in planned)
    write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths
