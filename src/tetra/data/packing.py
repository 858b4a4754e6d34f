"""Whole documents packed into rows without cross-contamination: each row holds complete documents (then padding),
every token knows its document, and the targets that would cross a document boundary or fall on padding are left
out of the loss. With the model's document-aware attention and positions, each document trains exactly as if it
were alone in its row.

Entry point: DocumentBatches(split, seq_len, batch_size, seed, rank, world_size, pad_id).batch(position) -> Batch.
"""

from __future__ import annotations

import numpy as np
import torch

from tetra.data.batch import Batch
from tetra.data.shards import TokenSplit
from tetra.errors import DataError


def pack_documents(lengths: np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """Rows of document indices, each row's total length <= capacity: documents in a seeded order, first fit
    among the rows so far (so short documents fill the gaps long ones leave). Deterministic in (lengths, seed);
    the search is one vectorized comparison per document."""
    order = np.random.default_rng([seed, 7]).permutation(len(lengths))
    rows: list[list[int]] = []
    free = np.empty(len(lengths), dtype=np.int64)  # room left in each row (at most one row per document)
    for document in order.tolist():
        length = int(lengths[document])
        fits = np.flatnonzero(free[: len(rows)] >= length)
        if len(fits):
            row = int(fits[0])
        else:
            row = len(rows)
            rows.append([])
            free[row] = capacity
        rows[row].append(document)
        free[row] -= length
    return rows


class DocumentBatches:
    """Deterministic, resumable, rank-aware batches of packed documents (the same contract as PackedBatches: a
    batch is a pure function of its position; rank r takes rows [r * batch_size, (r + 1) * batch_size) of the
    global micro-batch)."""

    def __init__(self, split: TokenSplit, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, pad_id: int = 0) -> None:
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle, self.pad_id = seed, rank, world_size, shuffle, pad_id
        lengths = split.document_lengths()
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.lengths = lengths
        longest = int(lengths.max()) if len(lengths) else 0
        if longest > seq_len + 1:
            raise DataError(f"The data holds a document of {longest} tokens, longer than a packed row of "
                            f"data.seq_len + 1 = {seq_len + 1} tokens. Raise data.seq_len, or prepare the data "
                            f"again with --max-length {seq_len + 1} (and --too-long drop or truncate).")
        self.rows = pack_documents(lengths, seq_len + 1, seed if shuffle else 0)
        self.num_sequences = len(self.rows)
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            count = self.num_sequences
            order = np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle else np.arange(count)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, trained, document) for packed row `index`, each of seq_len + 1 entries; padding is document
        -1 and never trained."""
        width = self.seq_len + 1
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        trained = np.zeros(width, dtype=bool)
        document = np.full(width, -1, dtype=np.int64)
        cursor = 0
        for slot, doc in enumerate(self.rows[index]):
            start, length = int(self.starts[doc]), int(self.lengths[doc])
            tokens[cursor: cursor + length] = self.split.read(start, length)
            trained[cursor: cursor + length] = self.split.read_mask(start, length)
            document[cursor: cursor + length] = slot
            cursor += length
        return tokens, trained, document

    def batch(self, position: int) -> Batch:
        """This rank's batch for a micro-batch position. A target counts when it is trained and belongs to the
        same document as the token that predicts it (a document's first token is never a target)."""
        first = (position * self.world_size + self.rank) * self.batch_size
        rows = []
        for slot in range(first, first + self.batch_size):
            epoch, offset = divmod(slot, self.num_sequences)
            rows.append(self.row(int(self._order(epoch)[offset])))
        tokens, trained, document = (torch.from_numpy(np.stack(parts)) for parts in zip(*rows, strict=True))
        same_document = (document[:, 1:] == document[:, :-1]) & (document[:, 1:] >= 0)
        return Batch(tokens, trained[:, 1:] & same_document, document[:, :-1])

    def epoch_of(self, position: int) -> float:
        return position * self.world_size * self.batch_size / self.num_sequences
