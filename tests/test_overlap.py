"""Overlapped collectives give bit-identical training to blocking ones, and both match one process (gloo, fp32).

The overlapped run prefetches depth all-gathers, reduce-scatters weight gradients in the background, overlaps the
input-gradient all-reduce with the weight-gradient GEMM, and sums data-parallel gradients in buckets during the last
backward of each step (small buckets here, so each group has several, started in order)."""

from __future__ import annotations

from overlap_worker import train_both_ways
from tetra.parallel.launch import spawn_collect


def test_overlap_is_bit_identical_to_blocking_collectives_on_four_ranks():
    cases = [("llama", dict(data=2, depth=2), False), ("gpt2", dict(data=2, row=2), False),
             ("llama", dict(depth=2, col=2), False), ("gpt2", dict(depth=2, row=2), False),
             ("llama", dict(data=2, depth=2), True)]
    for result in spawn_collect(train_both_ways, 4, cases):
        label = f"{result['model']} {result['grid']} zero1={result['zero1']}"
        assert result["identical"], label
        assert result["loss_error"] <= 1e-5, f"{label}: loss error {result['loss_error']:.2e}"
        assert result["param_error"] <= 1e-5, f"{label}: parameter error {result['param_error']:.2e}"
