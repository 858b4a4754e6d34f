"""Tokenized data on disk: memory-mapped token shards per split, document offsets, and meta.json.

Entry points: ShardWriter (used by prepare) and PreparedData.open(folder) (used by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tetra.errors import DataError
from tetra.files import read_json

META = "meta.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and memory), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents (already ending in EOS) to fixed-size shard files of one split."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.document_starts: list[int] = []
        self.total = 0
        self._file = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = (self.folder / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def add(self, tokens: np.ndarray) -> None:
        """Write one document's tokens, splitting across shards at the size limit."""
        self.document_starts.append(self.total)
        written = 0
        while written < len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(len(tokens) - written, self.shard_tokens - self._in_shard)
            self._file.write(tokens[written: written + take].astype(self.dtype, copy=False).tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            written += take
        self.total += len(tokens)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> dict[str, Any]:
        """Close files, write the document offsets, return this split's entry for meta.json."""
        self.close()
        offsets = f"{self.split}-documents.npy"
        np.save(self.folder / offsets, np.asarray(self.document_starts, dtype=np.int64), allow_pickle=False)
        return {"tokens": self.total, "documents": len(self.document_starts), "shards": self.shards,
                "document_offsets": offsets}


@dataclass
class TokenSplit:
    """One split as a list of memory-mapped shards addressed as one long token stream."""

    shards: list[np.memmap]
    starts: np.ndarray  # global index of each shard's first token
    total: int

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, stitched across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[shard])
            piece = self.shards[shard][offset: offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass
class PreparedData:
    """A folder written by `tetra data prepare`: meta.json, tokenizer/, and token shards per split."""

    folder: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> PreparedData:
        folder = Path(folder)
        if not (folder / META).is_file():
            raise DataError(f"{folder} is not a prepared dataset (no {META}). Make one with "
                            "`tetra data prepare SOURCE --tokenizer TOKENIZER --out DIR`.")
        meta = read_json(folder / META, "prepared-data description")
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{folder / META} is not a tetra dataset description of format {FORMAT_VERSION}; "
                            "prepare the data again with this version of tetra.")
        return cls(folder, meta)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def tokenizer_folder(self) -> Path:
        return self.folder / "tokenizer"

    def split(self, name: str) -> TokenSplit:
        """Memory-map a split's shards, refusing missing or truncated files."""
        entry = self.meta["splits"].get(name)
        if entry is None or entry["tokens"] == 0:
            raise DataError(f"{self.folder} has no {name!r} tokens. Prepare the data with a "
                            f"{'--val-fraction above 0' if name == 'val' else 'non-empty source'}.")
        dtype = np.dtype(self.meta["dtype"])
        shards, starts, total = [], [], 0
        for shard in entry["shards"]:
            path = self.folder / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            size = path.stat().st_size if path.is_file() else -1
            if size != expected:
                state = "is missing" if size < 0 else f"has {size} bytes but meta.json records {expected}"
                raise DataError(f"Shard {path} {state}: the prepared data is truncated or damaged. Run "
                                "`tetra data prepare` again.")
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
            starts.append(total)
            total += shard["tokens"]
        return TokenSplit(shards, np.asarray(starts, dtype=np.int64), total)
