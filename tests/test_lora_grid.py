"""LoRA on the 4D grid equals one process: the adapters split with their frozen base (A over the in-feature group,
B over the out-feature group) give the same loss, adapter gradients, global norm and parameters after 5 AdamW
steps, the frozen base never gets a gradient and stays bit-identical, and NEFTune on a row x col grid adds the
noise one process adds (gloo, CPU, fp32)."""

from __future__ import annotations

from lora_grid_worker import check_lora_grids
from tetra.parallel.launch import spawn_collect

TOLERANCE = 1e-5


def _assert_equal(results: list[dict]) -> None:
    for result in results:
        label = f"{result['model']} {result['grid']} layout={result['gemm_layout']} neftune={result['neftune']}"
        assert result["grad_names_match"], label
        assert result["frozen_grads"] == 0 and result["base_unchanged"], label
        for key in ("loss_error", "grad_error", "norm_error", "param_error"):
            assert result[key] <= TOLERANCE, f"{label}: {key} = {result[key]:.2e}"


def test_lora_on_two_rank_grids():
    cases = [(model, grid) for model in ("llama", "gpt2") for grid in (dict(row=2), dict(col=2), dict(depth=2))]
    cases += [("llama", dict(row=2), "in_out"), ("odd", dict(depth=2)), ("llama", dict(col=2), "out_in", 5.0)]
    _assert_equal(spawn_collect(check_lora_grids, 2, cases))


def test_lora_on_four_rank_grids():
    cases = [("llama", dict(row=2, col=2)), ("gpt2", dict(depth=2, col=2)), ("llama", dict(data=2, row=2), "in_out"),
             ("gpt2", dict(row=2, col=2), "out_in", 5.0)]
    _assert_equal(spawn_collect(check_lora_grids, 4, cases))
