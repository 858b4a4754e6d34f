"""Worker for GaLore and Conda on the 4D grid: a grid run equals one process (steps that refresh the projection
included), each rank's state is its piece of the one-process state, and a sharded checkpoint resumes bit-exactly on
the same grid and, resharded, on another.

Entry point: check_lowrank_grids(rank, world, port, cases, out_path), started by spawn_collect.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lora_grid_worker import _adapted
from parallel_worker import MODELS, _max_error, run_cases
from tetra.config import TrainConfig
from tetra.model import ModelConfig, Transformer
from tetra.model.sharded_io import SHARDS
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.layout import unshard
from tetra.parallel.parallelize import (
    clip_global_grad_norm,
    full_state_dict,
    linear_block_shapes,
    parallel_next_token_loss,
    parallelize,
    sync_gradients,
)
from tetra.train.losses import next_token_loss
from tetra.train.optim import build_optimizer
from tetra.train.sharded_checkpoint import load_shards, shard_state, state_layout

MAX_NORM = 0.5


def _config(optimizer: str) -> TrainConfig:
    # rank 3 < every matrix's short side; a refresh every 2 steps; eps well above fp32 noise (as the AdamW test)
    return TrainConfig(lr=1e-2, weight_decay=0.1, eps=1e-3, optimizer=optimizer, galore_rank=3, galore_scale=1.0,
                       projection_interval=2)


def _tokens(model_name: str, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, MODELS[model_name.removesuffix("+lora")]["vocab_size"], (8, 9), generator=generator)


def _build(model_name: str, shape: dict, gemm_layout: str, optimizer: str):
    """model_name "NAME+lora": adapters on every projection of a frozen base, projected by the optimizer."""
    grid = ProcessGrid.build(GridShape(**shape))
    if model_name.endswith("+lora"):
        reference = _adapted(model_name.removesuffix("+lora"))
    else:
        torch.manual_seed(0)
        reference = Transformer(ModelConfig(**MODELS[model_name]))
        reference.init_weights(std=0.2)
    layouts = dict.fromkeys(linear_block_shapes(reference, grid), gemm_layout)
    parallel = parallelize(copy.deepcopy(reference), grid, gemm_layouts=layouts)
    return grid, parallel, build_optimizer(parallel, _config(optimizer), grid), reference


def _grid_steps(model, optimizer, grid: ProcessGrid, model_name: str, steps: range) -> None:
    for step in steps:
        tokens = _tokens(model_name, step)
        local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
        loss, _ = parallel_next_token_loss(model, local, grid, tokens[:, 1:].numel())
        loss.backward()
        sync_gradients(model, grid)
        clip_global_grad_norm(model, grid, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _whole_state(model, optimizer, grid: ProcessGrid) -> dict[str, torch.Tensor]:
    """Every state tensor made whole through its own layout (the projected ones' differ from the weight's)."""
    return {f"{name}/{key}": unshard(value, state_layout(optimizer, parameter, key), grid).clone()
            for name, parameter in model.named_parameters()
            for key, value in optimizer.state[parameter].items() if torch.is_tensor(value) and value.dim() > 0}


def _check_equal(model_name: str, shape: dict, gemm_layout: str, optimizer_name: str) -> dict:
    """5 clipped steps (refreshes at steps 0, 2, 4) on the grid vs one process: weights and the state of every
    matrix equal within fp32 reduction-order noise."""
    grid, parallel, optimizer, reference = _build(model_name, shape, gemm_layout, optimizer_name)
    ref_optimizer = build_optimizer(reference, _config(optimizer_name))
    for step in range(5):
        next_token_loss(reference, _tokens(model_name, step))[0].backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)
    _grid_steps(parallel, optimizer, grid, model_name, range(5))
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}
    # The singular vectors' signs are arbitrary, so the projector and basis are compared through what they span;
    # the moments of a projected matrix, like its update, do not depend on the signs' choice up to that sign.
    state = _whole_state(parallel, optimizer, grid)
    ref_state = {f"{n}/{k}": v for n, p in reference.named_parameters()
                 for k, v in ref_optimizer.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
    # A projector [n, r] is compared through the subspace it spans (P P^T); a square basis spans everything, so its
    # vectors are compared one by one up to sign (|U^T U_ref| = I).
    span_errors = [float((state[key] @ state[key].T - ref @ ref.T).abs().max())
                   for key, ref in ref_state.items() if key.endswith("/projector")]
    basis_errors = [float(((state[key].T @ ref).abs() - torch.eye(ref.shape[1])).abs().max())
                    for key, ref in ref_state.items() if key.endswith("/basis")]
    # Both moments; GaLore's (of P^T G) change sign with the projector's vectors, so they are compared by size.
    moments = {key: value.abs() for key, value in state.items() if key.endswith(("exp_avg_sq", "exp_avg"))}
    ref_moments = {key: ref_state[key].abs() for key in moments}
    # What each rank stores of the projected matrices' moments, against one process's moments and the weights.
    matrices = [(p, r) for p, r in zip(parallel.parameters(), reference.parameters(), strict=True)
                if "projector" in optimizer.state[p] or "basis" in optimizer.state[p]]
    moment_share = sum(optimizer.state[p]["exp_avg_sq"].numel() for p, _ in matrices) / sum(
        ref_optimizer.state[r]["exp_avg_sq"].numel() for _, r in matrices)
    weight_share = sum(p.numel() for p, _ in matrices) / sum(r.numel() for _, r in matrices)
    return {"case": f"{optimizer_name} {model_name} {shape} {gemm_layout}", "depth": grid.size("depth"),
            "moment_share": moment_share, "weight_share": weight_share,
            "param_error": _max_error(full_state_dict(parallel, grid), ref_params),
            "state_keys_match": sorted(state) == sorted(ref_state),
            "span_error": max(span_errors, default=0.0), "basis_error": max(basis_errors, default=0.0),
            "moment_error": _max_error(moments, ref_moments),
            "projected": sum(key.endswith(("/projector", "/basis")) for key in state)}


def _check_resume(model_name: str, saved_on: dict, loaded_on: dict, optimizer_name: str, folder: str) -> dict:
    """3 steps, a sharded save, then 3 more; against a fresh model and optimizer that load the save (on the same
    grid or another) and run the same 3 steps."""
    folder = Path(folder) / f"{optimizer_name}-{model_name}-{'-'.join(f'{k}{v}' for k, v in saved_on.items())}"
    grid, straight, optimizer, _ = _build(model_name, saved_on, "out_in", optimizer_name)
    _grid_steps(straight, optimizer, grid, model_name, range(3))
    dcp.save(shard_state(straight, optimizer, grid), checkpoint_id=str(folder / SHARDS))
    load_grid, resumed, new_optimizer, _ = _build(model_name, loaded_on, "out_in", optimizer_name)
    with torch.no_grad():
        for parameter in resumed.parameters():
            parameter.zero_()  # loading must overwrite every value
    load_shards(folder, resumed, new_optimizer, load_grid)
    state_before = (_whole_state(straight, optimizer, grid), _whole_state(resumed, new_optimizer, load_grid))
    _grid_steps(straight, optimizer, grid, model_name, range(3, 6))
    _grid_steps(resumed, new_optimizer, load_grid, model_name, range(3, 6))
    expected, actual = full_state_dict(straight, grid), full_state_dict(resumed, load_grid)
    different = sorted(set(state_before[0]) ^ set(state_before[1])) + [
        key for key, value in state_before[0].items()
        if key in state_before[1] and not torch.equal(value, state_before[1][key])]
    return {"case": f"resume {optimizer_name} {model_name} {saved_on} -> {loaded_on}",
            "state_loaded_different": different,
            "bit_exact": all(torch.equal(actual[name], value) for name, value in expected.items()),
            "param_error": _max_error(actual, expected), "same_grid": saved_on == loaded_on,
            "rank": dist.get_rank()}


def check_lowrank_grids(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    run_cases(lambda kind, *case: (_check_equal if kind == "equal" else _check_resume)(*case), rank, world, port,
              cases, out_path)
