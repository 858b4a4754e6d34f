"""Test-time compute for a recurrent-depth or looped model: every forward call inside `recurrence_settings(...)`
iterates the core (or the looped stack) R times, or stops early by --exit-kl, without the generation code knowing;
the iterations run are recorded.

Entry point: recurrence_settings(model, steps, exit_kl) -> a context manager yielding the list of iterations run
per forward call (averaged over the rows, which exit on their own).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from tetra.errors import ConfigError


@contextmanager
def recurrence_settings(model: nn.Module, steps: int | None = None, exit_kl: float = 0.0) -> Iterator[list[int]]:
    """Forward calls of `model` in this block run `steps` core iterations (None: the trained mean), stopping once
    successive outputs differ by less than exit_kl (0: never early)."""
    config = model.config
    if (steps is not None or exit_kl) and not config.iterated:
        raise ConfigError("--recurrence and --exit-kl apply to recurrent-depth models (model.recurrent_core > 0) "
                          "and looped ones (model.loop > 0); this model has a fixed stack of blocks.")
    if steps is not None and steps < 1 or exit_kl < 0:
        raise ConfigError(f"--recurrence must be at least 1 and --exit-kl at least 0 (got {steps}, {exit_kl}).")
    used: list[int] = []

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        stats: dict = {}
        used.append(stats)
        kwargs.update(recurrence=steps, exit_kl=exit_kl, stats=stats)
        return args, kwargs

    handle = model.register_forward_pre_hook(inject, with_kwargs=True) if config.iterated else None
    steps_run: list[int] = []
    try:
        yield steps_run
    finally:
        if handle is not None:
            handle.remove()
        steps_run.extend(_mean_row_steps(stats) for stats in used)


def _mean_row_steps(stats: dict) -> float:
    """Iterations per row of one forward call (rows exit on their own), averaged; an int when all agree."""
    rows = stats.get("row_steps") or [stats.get("steps", 0)]
    return rows[0] if len(set(rows)) == 1 else sum(rows) / len(rows)
