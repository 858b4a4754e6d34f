"""Worker for sharded checkpoints across grids: weights and AdamW state saved on one grid (depth shards written as
they are) and loaded on another equal what was saved, bit for bit, and read whole in one process.

Entry point: check_checkpoint_grids(rank, world, port, cases, out_path), started by spawn_collect.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from parallel_worker import MODELS, run_cases
from tetra.model import ModelConfig, Transformer
from tetra.model.sharded_io import SHARDS, read_sharded_tensors
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.layout import unshard
from tetra.parallel.parallelize import full_state_dict, linear_block_shapes, parallel_next_token_loss, parallelize
from tetra.train.sharded_checkpoint import load_shards, shard_state


def _on_grid(model: Transformer, shape: dict, gemm_layout: str) -> tuple[Transformer, ProcessGrid]:
    grid = ProcessGrid.build(GridShape(**shape))
    layouts = dict.fromkeys(linear_block_shapes(model, grid), gemm_layout)
    return parallelize(copy.deepcopy(model), grid, gemm_layouts=layouts), grid


def _optimizer_state(model: Transformer, optimizer: torch.optim.Optimizer, grid: ProcessGrid) -> dict:
    return {f"{name}/{key}": unshard(value, parameter.tetra_layout, grid)
            for name, parameter in model.named_parameters()
            for key, value in optimizer.state[parameter].items() if value.dim() > 0}


def _check(model_name: str, saved_on: dict, loaded_on: dict, save_layout: str, load_layout: str, folder: str) -> dict:
    folder = Path(folder) / f"{model_name}-{'-'.join(f'{k}{v}' for k, v in saved_on.items())}-{save_layout}"
    reference = Transformer(ModelConfig(**MODELS[model_name]))
    reference.init_weights(0.2, seed=3)
    saved, grid = _on_grid(reference, saved_on, save_layout)
    optimizer = torch.optim.AdamW(saved.parameters(), lr=1e-2)
    tokens = torch.randint(0, MODELS[model_name]["vocab_size"], (4, 9), generator=torch.Generator().manual_seed(1))
    local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
    loss, _ = parallel_next_token_loss(saved, local, grid, tokens[:, 1:].numel())
    loss.backward()
    from tetra.parallel.parallelize import sync_gradients

    sync_gradients(saved, grid)
    optimizer.step()
    dcp.save(shard_state(saved, optimizer, grid), checkpoint_id=str(folder / SHARDS))
    weights, state = full_state_dict(saved, grid), _optimizer_state(saved, optimizer, grid)

    other = Transformer(ModelConfig(**MODELS[model_name]))
    other.init_weights(0.2, seed=4)  # other values everywhere: loading must overwrite them all
    loaded, load_grid = _on_grid(other, loaded_on, load_layout)
    new_optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    load_shards(folder, loaded, new_optimizer, load_grid)
    different = [name for name, value in full_state_dict(loaded, load_grid).items()
                 if not torch.equal(value, weights[name])]
    different += [key for key, value in _optimizer_state(loaded, new_optimizer, load_grid).items()
                  if not torch.equal(value, state[key])]
    whole = read_sharded_tensors(folder, "model/") if dist.get_rank() == 0 else weights
    different += [f"one process: {name}" for name, value in weights.items() if not torch.equal(whole[name], value)]
    failures = torch.tensor([len(different)])
    dist.all_reduce(failures)
    return {"case": f"{model_name} {saved_on} {save_layout} -> {loaded_on} {load_layout}", "different": different,
            "failures": int(failures)}


def check_checkpoint_grids(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    run_cases(_check, rank, world, port, cases, out_path)
