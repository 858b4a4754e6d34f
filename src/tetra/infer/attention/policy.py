"""Which attention a run decodes with, and the cache that implements it.

Entry point: AttentionPolicy (what --attention/--budget/--recent/--rank/--index say); factory.make_cache builds
the cache that implements it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tetra.errors import ConfigError

POLICIES = ("dense", "topk", "topk-index", "loki", "h2o")
INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class AttentionPolicy:
    """A decoding attention policy. budget is the share of the long prefix each decode step attends to (0.02 = 2%),
    or, above 1, a number of keys; recent newest tokens are always attended densely on top of it."""

    kind: str = "dense"
    budget: float = 1.0
    recent: int = 64
    rank: int | None = None  # Loki: principal dimensions used to score keys (None: head_dim / 4)
    index: str = "flat"  # topk-index: flat (exact), ivf or hnsw
    probe: float = 0.25  # topk-index with ivf: share of the inverted lists each search visits (1 = exact)
    loki_path: str | None = None  # Loki: the calibration file (None: loki.safetensors in the model folder)

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in POLICIES:
            problems.append(f"--attention {self.kind!r} is not one of {', '.join(POLICIES)}")
        if not self.budget > 0:
            problems.append(f"--budget must be > 0 (a share like 0.02, or a number of keys; got {self.budget})")
        if self.recent < 1:
            problems.append(f"--recent must be at least 1 (got {self.recent}): the newest token always attends itself")
        if self.index not in INDEX_KINDS:
            problems.append(f"--index {self.index!r} is not one of {', '.join(INDEX_KINDS)}")
        if not 0 < self.probe <= 1:
            problems.append(f"--probe must lie in (0, 1] (got {self.probe})")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1 (got {self.rank})")
        if problems:
            raise ConfigError("Invalid attention options: " + "; ".join(problems) + ".")

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    def keys_for(self, length: int) -> int:
        """How many of `length` prefix keys the budget selects (all of them at budget 1)."""
        if length <= 0:
            return 0
        wanted = math.ceil(self.budget * length) if self.budget <= 1 else int(self.budget)
        return max(1, min(length, wanted))

    def describe(self) -> str:
        if self.dense:
            return "dense"
        share = f"{self.budget:g}" if self.budget > 1 else f"{self.budget * 100:g}%"
        extra = {"topk-index": f", {self.index} index", "loki": f", rank {self.rank or 'D/4'}"}.get(self.kind, "")
        return f"{self.kind} (budget {share} + {self.recent} recent{extra})"
