"""Tokenized data on disk: memory-mapped token shards per split, document offsets, optional loss-mask shards (one
byte per token: 1 = trained; chat data has them) and meta.json.

Entry points: ShardWriter (used by prepare) and PreparedData.open(folder) (used by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tetra.errors import DataError
from tetra.files import read_json
from tetra.integrity import check_manifest, has_manifest

META = "meta.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and memory), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents (already ending in EOS) to fixed-size shard files of one split; with_mask also writes each
    token's loss-mask byte to a parallel shard."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, with_mask: bool = False) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.with_mask = with_mask
        self.shards: list[dict[str, Any]] = []
        self.document_starts: list[int] = []
        self.total = 0
        self._files: list[Any] = []
        self._in_shard = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        entry: dict[str, Any] = {"file": name, "tokens": 0}
        self._files = [(self.folder / name).open("wb")]
        if self.with_mask:
            entry["mask_file"] = f"{self.split}-mask-{len(self.shards):05d}.bin"
            self._files.append((self.folder / entry["mask_file"]).open("wb"))
        self.shards.append(entry)
        self._in_shard = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Write one document's tokens (and mask), splitting across shards at the size limit."""
        if self.with_mask and (mask is None or len(mask) != len(tokens)):
            raise ValueError("a masked split needs one mask value per token")
        self.document_starts.append(self.total)
        written = 0
        while written < len(tokens):
            if not self._files or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(len(tokens) - written, self.shard_tokens - self._in_shard)
            self._files[0].write(tokens[written: written + take].astype(self.dtype, copy=False).tobytes())
            if self.with_mask:
                self._files[1].write(mask[written: written + take].astype(np.uint8).tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            written += take
        self.total += len(tokens)

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []

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
    masks: list[np.memmap] | None = None  # loss-mask shards, aligned with `shards` (None: every token trained)
    document_starts: np.ndarray | None = None  # index of each document's first token

    def _stitch(self, files: list[np.memmap], start: int, length: int) -> np.ndarray:
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[shard])
            piece = files[shard][offset: offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, stitched across shard boundaries."""
        return self._stitch(self.shards, start, length)

    def read_mask(self, start: int, length: int) -> np.ndarray:
        """Loss-mask values (bool) of the same tokens; all True for data without masks."""
        if self.masks is None:
            return np.ones(length, dtype=bool)
        return self._stitch(self.masks, start, length).astype(bool)

    def document_lengths(self) -> np.ndarray:
        """Tokens of each document, in stored order."""
        if self.document_starts is None:
            return np.asarray([self.total], dtype=np.int64)
        return np.diff(np.append(self.document_starts, self.total))


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
        data = cls(folder, meta)
        data.verify(hashes=False)
        return data

    def verify(self, hashes: bool = True) -> None:
        """Check every file against the manifest written at preparation: sizes (one stat each, done at every open)
        or, with hashes, every byte. Data prepared before manifests existed passes unchecked."""
        if not has_manifest(self.folder):
            return
        problems = check_manifest(self.folder, hashes)
        if problems:
            raise DataError(f"The prepared data in {self.folder} is truncated or damaged: {'; '.join(problems[:4])}. "
                            "Prepare it again from its source (or restore the folder from a copy).")

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
        shards, masks, starts, total = [], [], [], 0
        for shard in entry["shards"]:
            shards.append(self._map(shard["file"], dtype, shard["tokens"]))
            if "mask_file" in shard:
                masks.append(self._map(shard["mask_file"], np.dtype(np.uint8), shard["tokens"]))
            starts.append(total)
            total += shard["tokens"]
        offsets = self.folder / entry.get("document_offsets", "")
        document_starts = np.load(offsets, allow_pickle=False) if offsets.is_file() else None
        return TokenSplit(shards, np.asarray(starts, dtype=np.int64), total, masks or None, document_starts)

    def _map(self, name: str, dtype: np.dtype, tokens: int) -> np.memmap:
        """Memory-map one shard file, refusing a missing or truncated one."""
        path = self.folder / name
        expected = tokens * dtype.itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            state = "is missing" if size < 0 else f"has {size} bytes but meta.json records {expected}"
            raise DataError(f"Shard {path} {state}: the prepared data is truncated or damaged. Run "
                            "`tetra data prepare` again.")
        return np.memmap(path, dtype=dtype, mode="r")

    @property
    def has_loss_mask(self) -> bool:
        """Whether the data says which tokens are trained (chat data does)."""
        return bool(self.meta.get("loss_mask", False))
