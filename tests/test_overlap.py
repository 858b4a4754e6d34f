"""Overlapped collectives give bit-identical training to blocking ones, whether depth-sharded weight blocks are
gathered again in backward or kept from forward (the default), and all match one process (gloo, fp32).

The overlapped run prefetches depth all-gathers, reduce-scatters weight gradients in the background, overlaps the
input-gradient all-reduce with the weight-gradient GEMM, and sums data-parallel gradients in buckets during the last
backward of each step (small buckets here, so each group has several, started in order). Two cases store the
weights [in, out], the other GEMM layout."""

from __future__ import annotations

from overlap_worker import embedding_rows_summed, input_gradient_gemms, saved_bytes_both_ways, train_both_ways
from tetra.parallel.launch import spawn_collect


def test_overlap_is_bit_identical_to_blocking_collectives_on_four_ranks():
    cases = [("llama", dict(data=2, depth=2), False, "out_in"), ("gpt2", dict(data=2, row=2), False, "out_in"),
             ("llama", dict(depth=2, col=2), False, "out_in"), ("gpt2", dict(depth=2, row=2), False, "in_out"),
             ("llama", dict(data=2, depth=2), True, "out_in"), ("llama", dict(data=2, depth=2), False, "in_out"),
             ("llama", dict(data=2, col=2), False, "out_in")]  # the untied embedding's touched-rows sum
    for result in spawn_collect(train_both_ways, 4, cases):
        label = f"{result['model']} {result['grid']} zero1={result['zero1']} layout={result['gemm_layout']}"
        assert result["identical"], label
        assert result["loss_error"] <= 1e-5, f"{label}: loss error {result['loss_error']:.2e}"
        assert result["param_error"] <= 1e-5, f"{label}: parameter error {result['param_error']:.2e}"


def test_gathering_again_in_backward_keeps_no_weight_block_between_the_passes():
    saved = spawn_collect(saved_bytes_both_ways, 2, "llama")
    assert saved["keep"] - saved["regather"] == saved["blocks"], saved


def test_a_split_linear_skips_the_input_gradient_its_input_does_not_need():
    result = spawn_collect(input_gradient_gemms, 2)
    assert result["False"] == {"gemms": 0, "has_input_grad": False, "weight_error": result["False"]["weight_error"]}
    assert result["True"]["gemms"] == 1 and result["True"]["has_input_grad"], result
    assert max(result["False"]["weight_error"], result["True"]["weight_error"]) < 1e-5, result


def test_the_embedding_gradient_sum_sends_only_rows_some_rank_touched():
    """Data-parallel ranks whose tokens use vocabulary rows 0-15 and 8-23 sum 24 of the 64 rows, and the summed
    table equals the dense all-reduce's (rows nobody touched are zero on every rank)."""
    result = spawn_collect(embedding_rows_summed, 2)
    assert result["embedding_rows"] == [24], result
    assert result["max_error"] == 0.0 and result["untouched_zero"], result
