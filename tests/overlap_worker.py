"""Worker for the overlap tests: train a few steps on a grid with overlapped collectives (depth blocks gathered again
in backward, or kept from forward) and with blocking ones.

Entry points: train_both_ways(rank, world, port, cases, out_path) and saved_bytes_both_ways(...), started by
torch.multiprocessing.spawn.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist

from parallel_worker import MODELS, _max_error, _reference_and_parallel
from tetra.config import GoldfishConfig
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.parallelize import full_state_dict, linear_block_shapes, parallelize
from tetra.parallel.tensor_parallel import TensorParallelLinear
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.replica import Replica

GLOBAL_BATCH, SEQ, STEPS, ACCUMULATION = 8, 8, 3, 2


def _adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, eps=1e-3)


def _train(model: torch.nn.Module, grid: ProcessGrid | None, zero1: bool, tokens: torch.Tensor) -> list[float]:
    """STEPS optimizer steps through the trainer's Replica, two micro-batches each; returns the losses."""
    replica = Replica(grid, zero1=zero1)
    optimizer = ZeroOptimizer([{"params": list(model.parameters())}], grid, _adamw) if zero1 else \
        _adamw(model.parameters())
    local = tokens if grid is None else tokens.chunk(grid.size("batch"))[grid.index("batch")]
    losses = []
    for _ in range(STEPS):
        losses.append(replica.accumulate(model, list(local.chunk(ACCUMULATION)), GoldfishConfig()).loss)
        replica.finish_backward(model, 0.5, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _case(model_name: str, shape: GridShape, zero1: bool, gemm_layout: str) -> dict:
    grid = ProcessGrid.build(shape)
    reference, _ = _reference_and_parallel(model_name, grid)
    layouts = dict.fromkeys(linear_block_shapes(reference, grid), gemm_layout)
    vocab = MODELS[model_name]["vocab_size"]
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    results = []
    # Overlapped with depth blocks gathered again in backward, overlapped keeping them (the default), and blocking.
    for overlap, regather in ((True, True), (True, False), (False, True)):
        model = parallelize(copy.deepcopy(reference), grid, overlap=overlap, gemm_layouts=layouts, regather=regather)
        model.comm_schedule.bucket_bytes = 2048  # several buckets per group, even for this small model
        losses = _train(model, grid, zero1, tokens)
        results.append((losses, full_state_dict(model, grid)))
    single_losses = _train(reference, None, False, tokens)
    (on_losses, on_state) = results[0]
    identical = all(losses == on_losses and all(torch.equal(on_state[n], state[n]) for n in on_state)
                    for losses, state in results[1:])
    return {"model": model_name, "grid": shape.__dict__, "zero1": zero1, "gemm_layout": gemm_layout,
            "identical": identical,
            "loss_error": max(abs(a - b) / abs(b) for a, b in zip(on_losses, single_losses, strict=True)),
            "param_error": _max_error(on_state, {n: p.detach() for n, p in reference.named_parameters()})}


def train_both_ways(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [_case(model_name, GridShape(**shape), zero1, layout) for model_name, shape, zero1, layout in cases]
        if rank == 0:
            with open(out_path, "w") as handle:
                json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def saved_bytes_both_ways(rank: int, world: int, port: int, model_name: str, out_path: str) -> None:
    """Bytes autograd keeps for backward after one forward on a depth grid (world ranks), with blocks gathered
    again in backward and kept; and the bytes of every depth-sharded Linear's whole block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grid = ProcessGrid.build(GridShape(depth=world))
        reference, _ = _reference_and_parallel(model_name, grid)
        tokens = torch.randint(0, MODELS[model_name]["vocab_size"], (2, SEQ + 1),
                               generator=torch.Generator().manual_seed(1))
        result = {}
        for regather in (True, False):
            model = parallelize(copy.deepcopy(reference), grid, regather=regather)
            saved: list[int] = []

            def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
                saved.append(tensor.numel() * tensor.element_size())
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = Replica(grid).token_losses(model, tokens).sum()
            loss.backward()
            model.comm_schedule.finish()
            result["regather" if regather else "keep"] = sum(saved)
            result["blocks"] = sum(m.stored_shape[0] * m.stored_shape[1] * 4 for m in model.modules()
                                   if isinstance(m, TensorParallelLinear))
        if rank == 0:
            with open(out_path, "w") as handle:
                json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def input_gradient_gemms(rank: int, world: int, port: int, out_path: str) -> None:
    """A split Linear (out-features over rows) fed an input that needs no gradient and one that does: how many
    input-gradient GEMMs each backward ran, and the largest error of the weight-gradient shard against one process."""
    import tetra.parallel.tensor_parallel as tensor_parallel
    from tetra.parallel.layout import shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grid = ProcessGrid.build(GridShape(row=world))
        torch.manual_seed(0)
        linear = torch.nn.Linear(16, 32, bias=False)
        layer = TensorParallelLinear(linear, grid, transposed=False)
        x, grad_y = torch.randn(6, 16), torch.randn(6, 32)
        linear(x).backward(grad_y)
        expected = shard(linear.weight.grad, layer.weight.tetra_layout, grid)
        calls = {"count": 0}
        counted = tensor_parallel.input_grad_gemm

        def counting(*args, **kwargs):
            calls["count"] += 1
            return counted(*args, **kwargs)

        tensor_parallel.input_grad_gemm = counting
        result = {}
        for needs_grad in (False, True):
            calls["count"], layer.weight.grad = 0, None
            x_in = x.clone().requires_grad_(needs_grad)
            local_grad = grad_y.chunk(world, dim=-1)[grid.index("row")]
            layer(x_in).backward(local_grad)
            layer.schedule.finish()
            result[str(needs_grad)] = {"gemms": calls["count"], "has_input_grad": x_in.grad is not None,
                                       "weight_error": float((layer.weight.grad - expected).abs().max())}
        tensor_parallel.input_grad_gemm = counted
        if rank == 0:
            with open(out_path, "w") as handle:
                json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def embedding_rows_summed(rank: int, world: int, port: int, out_path: str) -> None:
    """One backward on a data-parallel grid whose ranks use different vocabulary rows: the row counts of the
    embedding's all-reduces (width-32 rows) and the largest difference from a dense all-reduce of the gradient."""
    import tetra.parallel.overlap as overlap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grid = ProcessGrid.build(GridShape(data=world))
        reference, _ = _reference_and_parallel("llama", grid)
        model = parallelize(copy.deepcopy(reference), grid)
        sizes, started = [], overlap.start_all_reduce

        def recording(tensor, group, blocking=False):
            if tensor.dim() == 2 and tensor.shape[1] == MODELS["llama"]["hidden_size"]:
                sizes.append(tensor.shape[0])
            return started(tensor, group, blocking)

        overlap.start_all_reduce = recording
        # inputs (all but each row's last token) are exactly ids 8 rank .. 8 rank + 15
        tokens = 8 * rank + torch.arange(2 * (SEQ + 1)).view(2, SEQ + 1) - torch.tensor([[0], [1]])
        tokens = tokens.clamp(max=8 * rank + 15)
        replica = Replica(grid)
        replica.accumulate(model, [tokens], GoldfishConfig())
        dense = model.embed.weight.grad.clone()  # this rank's own gradient, before its sum is copied in
        model.comm_schedule.finish()
        overlap.start_all_reduce = started
        dist.all_reduce(dense, group=grid.groups["data"])
        summed = model.embed.weight.grad.view(model.embed.block_shape)
        result = {"embedding_rows": sizes, "max_error": float((summed - dense.view_as(summed)).abs().max()),
                  "untouched_zero": bool((summed[24:] == 0).all())}
        if rank == 0:
            with open(out_path, "w") as handle:
                json.dump(result, handle)
    finally:
        dist.destroy_process_group()
