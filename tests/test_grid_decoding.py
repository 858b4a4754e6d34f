"""Generation on the grid: a model loaded piece by piece over row x col (and depth, data) decodes greedily to the
same tokens as one process, with a KV cache split by heads."""

from __future__ import annotations

import pytest

from decoding_worker import check_decoding
from hf_factory import save_hf_folder
from tetra.parallel.launch import spawn_collect


def test_tensor_parallel_greedy_decoding_equals_one_process(tmp_path):
    pytest.importorskip("transformers")
    llama = save_hf_folder(tmp_path / "llama", "llama-gqa2")  # rotary, grouped-query heads, untied
    gpt2 = save_hf_folder(tmp_path / "gpt2", "gpt2")  # learned positions, fused q/k/v, tied head
    cases = [(llama, dict(row=2, col=2)), (gpt2, dict(row=2, col=2)), (llama, dict(depth=2, row=2)),
             (gpt2, dict(data=2, col=2))]
    for result in spawn_collect(check_decoding, 4, cases):
        label = f"{result['source']} {result['grid']}"
        assert result["actual"] == result["expected"], label
        assert result["logit_error"] < 1e-4, label
        assert result["cache_heads"] == result["local_heads"], label
