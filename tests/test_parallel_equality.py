"""4D grids equal one process: loss, every gradient and 5 AdamW steps with global-norm clipping (gloo, CPU, fp32).

Each test spawns one set of processes and checks several grids with a Llama-style model (GQA, no bias) and a
GPT-2-style one (biases in both layer layouts, LayerNorm, learned positions, tied head), abacus digit places, odd
sizes (padded depth shards), ZeRO-1 (optimizer state sharded over data), the goldfish loss, weights stored
[in, out] (the other GEMM layout), and activation checkpointing (whole blocks, attention or MLP) on the grid.
"""

from __future__ import annotations

from parallel_worker import check_grids
from tetra.parallel.gemm_layout import OUT_IN
from tetra.parallel.launch import spawn_collect

TOLERANCE = 1e-5


def _run(world: int, grids: list[dict], extra_cases: tuple = ()) -> list[dict]:
    cases = [(model, grid) for grid in grids for model in ("llama", "gpt2")] + list(extra_cases)
    return spawn_collect(check_grids, world, cases)


def _assert_equal(results: list[dict]) -> None:
    for result in results:
        label = (f"{result['model']} {result['grid']} zero1={result['zero1']} goldfish={result['goldfish_k']} "
                 f"layout={result['gemm_layout']} packed={result['packed']} recompute={result['checkpointing']}")
        assert result["grad_names_match"], label
        for key in ("loss_error", "grad_error", "norm_error", "param_error"):
            assert result[key] <= TOLERANCE, f"{label}: {key} = {result[key]:.2e}"


def test_two_rank_grids():
    grids = [dict(data=2), dict(depth=2), dict(row=2), dict(col=2)]
    extra = [("odd", dict(depth=2)), ("gpt2", dict(data=2), True), ("odd", dict(data=2), True),
             ("odd", dict(depth=2), False, 0, "in_out"), ("gpt2", dict(row=2), False, 0, "in_out"),
             ("abacus", dict(col=2)), ("abacus", dict(depth=2)),
             # activation checkpointing on the grid: the recomputed forward repeats its collectives
             ("llama", dict(depth=2), False, 0, OUT_IN, False, "block"),
             ("gpt2", dict(row=2), False, 0, OUT_IN, False, "attention"),
             ("llama", dict(col=2), False, 0, OUT_IN, False, "mlp")]
    _assert_equal(_run(2, grids, extra_cases=extra))


def test_four_rank_grids():
    grids = [dict(row=2, col=2), dict(depth=2, row=2), dict(data=2, col=2)]
    # The goldfish loss through the trainer's step: vocabulary-parallel per-token losses, masks on every rank's own
    # samples, normalization by the global kept-token count, two micro-batches.
    goldfish = [("llama", dict(data=2, row=2), False, 4), ("gpt2", dict(depth=2, col=2), False, 3)]
    transposed = [("llama", dict(depth=2, col=2), False, 0, "in_out"),
                  ("gpt2", dict(depth=2, row=2), False, 0, "in_out"),
                  ("llama", dict(data=2, depth=2), True, 0, "in_out")]
    # Packed documents with a loss mask (chat data): block-diagonal attention, restarting learned positions, the
    # loss normalized over the trained targets of both micro-batches and every rank.
    packed = [("gpt2", dict(data=2, row=2), False, 0, OUT_IN, True), ("llama", dict(depth=2, col=2), False, 0,
                                                                     OUT_IN, True),
              ("gpt2", dict(depth=2, row=2), False, 0, OUT_IN, True, "block")]
    _assert_equal(_run(4, grids, extra_cases=goldfish + transposed + packed))


def test_eight_rank_grids():
    grids = [dict(data=2, depth=2, row=2), dict(row=2, col=2, depth=2)]
    _assert_equal(_run(8, grids, extra_cases=[("llama", dict(data=2, depth=2, row=2), True)]))
