"""Packed, deterministic, resumable, rank-aware batches of seq_len + 1 tokens.

Entry point: PackedBatches(split, seq_len, batch_size, seed, rank, world_size).batch(position).
"""

from __future__ import annotations

import numpy as np
import torch

from tetra.data.shards import TokenSplit
from tetra.errors import DataError


class PackedBatches:
    """Sequences cut back to back from the packed token stream (documents joined by EOS).

    A batch is a pure function of its position (micro-batches since training began), so resuming at a position
    reproduces the exact batches, and ranks take disjoint slices of the same global micro-batch: rank r of W gets
    rows [r * batch_size, (r + 1) * batch_size) of what one process with W * batch_size rows would get.
    """

    def __init__(self, split: TokenSplit, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.num_sequences = (split.total - 1) // seq_len
        if self.num_sequences < 1:
            raise DataError(f"The data holds {split.total} tokens: not enough for one sequence of "
                            f"data.seq_len + 1 = {seq_len + 1} tokens. Use more data or a shorter data.seq_len.")
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """The permutation of sequences for one epoch (kept for the current epoch only)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                order = np.arange(self.num_sequences)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def sequence(self, index: int) -> np.ndarray:
        """Tokens [index * seq_len, index * seq_len + seq_len + 1): inputs and the shifted labels."""
        return self.split.read(index * self.seq_len, self.seq_len + 1)

    def batch(self, position: int) -> torch.Tensor:
        """This rank's [batch_size, seq_len + 1] token tensor for a micro-batch position."""
        first = (position * self.world_size + self.rank) * self.batch_size
        rows = []
        for slot in range(first, first + self.batch_size):
            epoch, offset = divmod(slot, self.num_sequences)
            rows.append(self.sequence(int(self._order(epoch)[offset])))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def epoch_of(self, position: int) -> float:
        """How many passes over the data the micro-batches before `position` made."""
        return position * self.world_size * self.batch_size / self.num_sequences
