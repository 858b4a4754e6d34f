"""Teardown never aborts: the pattern that once ended with a rank killed by SIGABRT at exit ("terminate called
without an active exception", benchmarks/strategies.py's first 4D grid) repeated in fresh processes; a rank dying
by a signal fails the spawn."""

from __future__ import annotations

import pytest

import teardown_worker
from tetra.parallel.launch import spawn_collect


@pytest.mark.slow
def test_a_depth_grid_tears_down_cleanly_every_time():
    for attempt in range(12):
        result = spawn_collect(teardown_worker.run, 4, 2)
        assert result == {"ranks_sum": 6.0}, attempt
