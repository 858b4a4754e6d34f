"""Worker for the multi-process equality tests: each grid vs one process on the same global batch (gloo, CPU, fp32).

Entry point: check_grids(rank, world, port, cases, out_path), started by torch.multiprocessing.spawn.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist

from tetra.config import GoldfishConfig
from tetra.data.batch import Batch
from tetra.model import ModelConfig, Transformer
from tetra.parallel.collectives import all_reduce
from tetra.parallel.gemm_layout import OUT_IN
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.launch import end_process_group
from tetra.parallel.parallelize import (
    clip_global_grad_norm,
    full_state_dict,
    linear_block_shapes,
    parallel_next_token_loss,
    parallelize,
    sync_gradients,
)
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.losses import next_token_loss
from tetra.train.replica import Replica
from tetra.train.setup import enable_activation_checkpointing

MODELS = {
    "llama": dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                  max_position_embeddings=32),
    "gpt2": dict(family="gpt2", vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=64,
                 max_position_embeddings=32, norm="layernorm", activation="gelu_tanh", gated_mlp=False,
                 positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True),
    # Abacus digit places instead of rotary (ids 3..12 are the digits; no training offset, so both sides agree).
    "abacus": dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=48,
                   max_position_embeddings=32, positions="abacus", abacus_digit_ids=list(range(3, 13)),
                   abacus_max_digits=16, abacus_max_offset=0),
    # Odd sizes: depth shards of 729-value blocks need zero padding.
    "odd": dict(vocab_size=63, hidden_size=27, n_layers=1, n_heads=3, intermediate_size=45, max_position_embeddings=32,
                qkv_bias=True, positions="learned"),
}
GLOBAL_BATCH, SEQ, STEPS, MAX_NORM = 8, 8, 5, 0.5


def _max_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor error relative to the tensor's own scale, floored at 1% of the largest tensor's scale.

    The floor matters for tensors whose exact value is zero: the key bias gradient (a constant added to every key
    cancels in the softmax) is pure rounding noise, which no two summation orders reproduce."""
    floor = 0.01 * max(float(t.abs().max()) for t in expected.values())
    return max(float((actual[n] - t).abs().max()) / max(float(t.abs().max()), floor) for n, t in expected.items())


def _reference_and_parallel(model_name: str, grid: ProcessGrid, gemm_layout: str = OUT_IN):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODELS[model_name]))
    model.init_weights(std=0.2)
    with torch.no_grad():  # non-zero biases and norm weights, so their gradients are really tested
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    layouts = dict.fromkeys(linear_block_shapes(model, grid), gemm_layout)  # every weight stored this way
    return model, parallelize(copy.deepcopy(model), grid, gemm_layouts=layouts)


def _packed(tokens: torch.Tensor) -> Batch:
    """Rows of three packed documents each (boundaries differ per row), with a random loss mask that, as the
    loader's, never crosses a boundary."""
    rows, width = tokens.shape[0], tokens.shape[1] - 1
    index = torch.arange(width + 1)
    documents = torch.stack([(index >= 2 + row % 3).long() + (index >= 6 + row % 2).long() for row in range(rows)])
    trained = torch.rand(rows, width, generator=torch.Generator().manual_seed(2)) < 0.7
    return Batch(tokens, trained & (documents[:, 1:] == documents[:, :-1]), documents[:, :-1])


def _chunk(batch: Batch, parts: int) -> list[Batch]:
    return [Batch(*pieces) for pieces in zip(batch.tokens.chunk(parts), batch.loss_mask.chunk(parts),
                                             batch.document_ids.chunk(parts), strict=True)]


def _check(model_name: str, shape: GridShape, zero1: bool = False, goldfish_k: int = 0,
           gemm_layout: str = OUT_IN, packed: bool = False, checkpointing: str = "none") -> dict:
    """zero1: optimizer state sharded over data; gradients then live in slices, so the loss, the global norm and
    the parameters after every step are what is compared. goldfish_k: both sides train through Replica.accumulate
    (the trainer's step) with the goldfish loss, two micro-batches per step. gemm_layout: how the grid's Linear
    blocks are stored (in_out: transposed, so every GEMM and the depth shards run the other way round). packed:
    rows of packed documents with a loss mask, through Replica.accumulate on both sides. checkpointing: the grid
    model recomputes this part of every block in backward (activation checkpointing), the reference does not."""
    grid = ProcessGrid.build(shape)
    reference, parallel = _reference_and_parallel(model_name, grid, gemm_layout)
    enable_activation_checkpointing(parallel, checkpointing)
    vocab = MODELS[model_name]["vocab_size"]
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
    labels = tokens[:, 1:].numel()
    # eps well above fp32 noise: with eps = 1e-8, Adam turns a rounding-level gradient (the key bias again) into a
    # full-size update whose sign depends on the rounding, and no two implementations could agree.
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3)
    def adamw(groups):
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, eps=1e-3)

    par_optimizer = ZeroOptimizer([{"params": list(parallel.parameters())}], grid, adamw) if zero1 else \
        adamw(parallel.parameters())
    result = {"model": model_name, "grid": shape.__dict__, "zero1": zero1, "goldfish_k": goldfish_k,
              "gemm_layout": gemm_layout, "packed": packed, "checkpointing": checkpointing, "grad_error": 0.0,
              "grad_names_match": True}
    for step in range(STEPS):
        if packed:
            batches = _chunk(_packed(tokens), grid.size("batch"))
            ref_value = Replica(None).accumulate(reference, _chunk(_packed(tokens), 2), GoldfishConfig()).loss
            local_batch = batches[grid.index("batch")]
            global_loss = Replica(grid).accumulate(parallel, _chunk(local_batch, 2), GoldfishConfig()).loss
        elif goldfish_k:
            goldfish = GoldfishConfig(k=goldfish_k, context=3)
            ref_value = Replica(None).accumulate(reference, list(tokens.chunk(2)), goldfish).loss
            global_loss = Replica(grid).accumulate(parallel, list(local.chunk(2)), goldfish).loss
        else:
            ref_loss, _ = next_token_loss(reference, tokens)
            ref_loss.backward()
            ref_value = ref_loss.item()
            loss, loss_sum = parallel_next_token_loss(parallel, local, grid, labels)
            loss.backward()
            global_loss = float(all_reduce(loss_sum.clone(), grid.groups["batch"])) / labels
        sync_gradients(parallel, grid, include_data=not zero1)
        if step == 0:
            result["loss_error"] = abs(global_loss - ref_value) / abs(ref_value)
        if step == 0 and not zero1:
            ref_grads = {n: p.grad for n, p in reference.named_parameters()}
            par_grads = full_state_dict(parallel, grid, gradients=True)
            result["grad_error"] = _max_error(par_grads, ref_grads)
            result["grad_names_match"] = sorted(par_grads) == sorted(ref_grads)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM))
        clip = par_optimizer.reduce_and_clip if zero1 else lambda limit: clip_global_grad_norm(parallel, grid, limit)
        par_norm = clip(MAX_NORM)
        result["norm_error"] = max(result.get("norm_error", 0.0), abs(par_norm - ref_norm) / ref_norm)
        for optimizer in (ref_optimizer, par_optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}
    result["param_error"] = _max_error(full_state_dict(parallel, grid), ref_params)
    return result


def run_cases(check, rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    """check(*case) for every case on this rank of a gloo group; rank 0 writes the results as JSON (read back by
    spawn_collect). Each worker's entry point passes its own check."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    succeeded = False
    try:
        results = [check(*case) for case in cases]
        if rank == 0:
            with open(out_path, "w") as handle:
                json.dump(results, handle)
        succeeded = True
    finally:
        end_process_group(wait_for_peers=succeeded)


def check_grids(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    """Every (model, grid, extras...) case against one process."""
    run_cases(lambda model_name, shape, *extra: _check(model_name, GridShape(**shape), *extra), rank, world, port,
              cases, out_path)
