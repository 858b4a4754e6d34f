"""Worker for tensor-parallel decoding: greedy generation from a model loaded piece by piece onto the grid must give
the tokens one process gives, and each rank's KV cache must hold only its row's heads.

Entry point: check_decoding(rank, world, port, cases, out_path), started by spawn_collect.
"""

from __future__ import annotations

import torch

from parallel_worker import run_cases
from tetra.infer.attention.factory import make_cache
from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.generate import generate_ids
from tetra.model.io import load_model
from tetra.parallel.decoding import load_split_model
from tetra.parallel.grid import GridShape, ProcessGrid

PROMPTS = [[5, 17, 42, 8, 3, 77, 12], [9, 31, 4]]  # different lengths: left padding and a key mask
NEW_TOKENS = 12


def _check(source: str, shape: dict) -> dict:
    grid = ProcessGrid.build(GridShape(**shape))
    reference = load_model(source, dtype=torch.float32)
    expected = generate_ids(reference, PROMPTS, NEW_TOKENS)
    split = load_split_model(source, grid)
    actual = generate_ids(split, PROMPTS, NEW_TOKENS)
    with torch.inference_mode():
        ids = torch.tensor([PROMPTS[0]])
        logit_error = float((split(ids) - reference(ids)).abs().max())
    cache = make_cache(split, AttentionPolicy(), 1, 8)
    local_heads = reference.config.kv_heads // grid.size("row")
    return {"source": source, "grid": shape, "expected": expected, "actual": actual, "logit_error": logit_error,
            "cache_heads": int(cache.keys.shape[2]), "local_heads": local_heads}


def check_decoding(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    run_cases(_check, rank, world, port, cases, out_path)
