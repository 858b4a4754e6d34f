"""Numerical faults in a step: a non-finite loss or gradient norm (stop, or skip the update and count it) and loss
spikes (a warning naming the step's data positions so the batch can be inspected).

Entry point: StepHealth(train config); the loop asks `verdict(any_rank_nonfinite)` before the optimizer step and
`spike(step, loss)` after it. Every rank gets the same answers: the non-finite flag is agreed on over the ranks
first, and the losses it sees are already totals over the batch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from tetra.config import TrainConfig


def is_nonfinite(loss: float, grad_norm: float) -> bool:
    return not (math.isfinite(loss) and math.isfinite(grad_norm))


@dataclass
class StepHealth:
    """Counters for non-finite steps and the recent losses spikes are measured against."""

    policy: str = "stop"  # stop | skip
    max_in_row: int = 5  # skip: non-finite steps in a row before the run stops anyway
    spike_sigmas: float = 0.0  # a loss this many standard deviations above the recent mean is a spike (0 = off)
    spike_window: int = 100  # recent steps the mean and deviation come from
    skipped: int = 0
    in_row: int = 0
    spikes: int = 0
    _recent: deque[float] = field(default_factory=deque)

    @classmethod
    def of(cls, train: TrainConfig) -> StepHealth:
        return cls(train.on_nonfinite, train.max_nonfinite_skips, train.spike_sigmas, train.spike_window)

    def verdict(self, nonfinite: bool) -> str:
        """"ok", "skip" (drop this update) or "stop" (the policy says so, or too many skips in a row)."""
        if not nonfinite:
            self.in_row = 0
            return "ok"
        if self.policy != "skip":
            return "stop"
        self.skipped, self.in_row = self.skipped + 1, self.in_row + 1
        return "stop" if self.in_row > self.max_in_row else "skip"

    def counters(self) -> dict[str, int]:
        return {"nonfinite_skipped": self.skipped, "nonfinite_in_row": self.in_row, "loss_spikes": self.spikes}

    def spike(self, loss: float) -> tuple[float, float] | None:
        """(recent mean, deviation) when `loss` is a spike against the full window before it, else None."""
        if self.spike_sigmas <= 0:
            return None
        found = None
        if len(self._recent) == self.spike_window:
            mean = sum(self._recent) / len(self._recent)
            deviation = math.sqrt(sum((value - mean) ** 2 for value in self._recent) / len(self._recent))
            if loss > mean + self.spike_sigmas * max(deviation, 1e-3 * abs(mean)):
                self.spikes += 1
                found = (mean, deviation)
            self._recent.popleft()
        self._recent.append(loss)
        return found
