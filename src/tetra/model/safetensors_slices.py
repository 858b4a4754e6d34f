"""Reading rectangles of tensors from safetensors files with positioned reads: only the bytes of the rows (and, for
a column range, of each row's columns) asked for are read, and nothing is memory-mapped, so a process that loads its
piece of a large model never maps or holds the whole file (safetensors' own reader maps all of it).

Entry point: SafetensorsSlices(path) with .shapes and .read(name, region).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from tetra.errors import CheckpointError
from tetra.model.safetensors_stream import DTYPE_CODES

DTYPES = {code: dtype for dtype, (code, _) in DTYPE_CODES.items()}
HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on a header


class SafetensorsSlices:
    """One safetensors file's header (names, dtypes, shapes, byte ranges), and region reads of its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._entries: dict[str, tuple[torch.dtype, int]] = {}  # dtype, absolute byte offset of the data
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > HEADER_LIMIT:
                    raise ValueError(f"a header of {length} bytes")
                header = json.loads(handle.read(length))
                size = os.fstat(handle.fileno()).st_size
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape = DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"])
                start, stop = entry["data_offsets"]
                if stop - start != math.prod(shape) * torch.empty((), dtype=dtype).element_size() or \
                        8 + length + stop > size:
                    raise ValueError(f"tensor {name}'s byte range does not match its shape or the file")
                self.shapes[name], self._entries[name] = shape, (dtype, 8 + length + start)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error}). It may be truncated or "
                                  "corrupt: copy it again from its source.") from None

    def read(self, name: str, region: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The [start, stop) range per dimension of tensor `name`; rows are read whole when every later dimension
        is whole (one read), else row by row over the column range (2-D)."""
        dtype, offset = self._entries[name]
        shape = self.shapes[name]
        item = torch.empty((), dtype=dtype).element_size()
        sizes = tuple(stop - start for start, stop in region)
        if not shape:
            return self._bytes_as(dtype, self._pread([(offset, item)]), ())
        inner = math.prod(shape[1:])
        (row_start, row_stop), rest = region[0], region[1:]
        if all(piece == (0, size) for piece, size in zip(rest, shape[1:], strict=True)):
            spans = [(offset + row_start * inner * item, (row_stop - row_start) * inner * item)]
        elif len(shape) == 2:
            (col_start, col_stop), width = rest[0], shape[1]
            spans = [(offset + (row * width + col_start) * item, (col_stop - col_start) * item)
                     for row in range(row_start, row_stop)]
        else:
            raise ValueError(f"{name}: only the first dimension of a {len(shape)}-D tensor can be cut")
        return self._bytes_as(dtype, self._pread(spans), sizes)

    def _pread(self, spans: list[tuple[int, int]]) -> bytearray:
        data = bytearray(sum(length for _, length in spans))
        view, position = memoryview(data), 0
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            for offset, length in spans:
                if length and os.preadv(descriptor, [view[position:position + length]], offset) != length:
                    raise CheckpointError(f"{self.path} ended early: it is truncated; copy it again.")
                position += length
        finally:
            os.close(descriptor)
        return data

    @staticmethod
    def _bytes_as(dtype: torch.dtype, data: bytearray, sizes: tuple[int, ...]) -> torch.Tensor:
        if not data:
            return torch.empty(sizes, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).view(sizes)
