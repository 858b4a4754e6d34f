"""Near-duplicate detection for generated text: MinHash signatures of word 3-gram shingles, banded into an LSH
index, so a new item is compared only with the few earlier items that share a band (Broder; the standard filter
for synthetic instruction data).

Entry point: NearDuplicateIndex(threshold).add(text) -> False when text (nearly) repeats an earlier one.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

PERMUTATIONS = 64
BANDS = 16  # 16 bands of 4 rows: pairs above ~0.5 Jaccard collide in some band with high probability
PRIME = (1 << 61) - 1


def normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def shingles(text: str, size: int = 3) -> set[str]:
    words = normalize(text).split()
    if len(words) < size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateIndex:
    """Items added so far; add() refuses exact (normalized) repeats and items whose estimated Jaccard similarity
    with an earlier one reaches threshold (confirmed on the exact shingle sets)."""

    def __init__(self, threshold: float = 0.7, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, PRIME, PERMUTATIONS, dtype=np.uint64)
        self.b = rng.integers(0, PRIME, PERMUTATIONS, dtype=np.uint64)
        self.threshold = threshold
        self.exact: set[str] = set()
        self.items: list[set[str]] = []
        self.buckets: dict[tuple[int, bytes], list[int]] = {}

    def _signature(self, items: set[str]) -> np.ndarray:
        hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % PRIME
                           for s in items], dtype=np.uint64)
        # (a * h + b) mod p in Python integers (uint64 products would overflow), min over shingles per permutation
        values = [[(int(a) * int(h) + int(b)) % PRIME for h in hashes] for a, b in zip(self.a, self.b, strict=True)]
        return np.array([min(row) for row in values], dtype=np.uint64)

    def add(self, text: str) -> bool:
        """Record text and return True, or return False (recording nothing) when it is a near-duplicate."""
        key = normalize(text)
        if not key or key in self.exact:
            return False
        items = shingles(text)
        signature = self._signature(items)
        rows = PERMUTATIONS // BANDS
        bands = [(band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(BANDS)]
        candidates = {index for band in bands for index in self.buckets.get(band, [])}
        if any(jaccard(items, self.items[index]) >= self.threshold for index in candidates):
            return False
        self.exact.add(key)
        self.items.append(items)
        for band in bands:
            self.buckets.setdefault(band, []).append(len(self.items) - 1)
        return True
