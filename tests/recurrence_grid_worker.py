"""Worker for the recurrent-depth grid test: a prelude / core / coda model with sandwich norms and the adapter on
a grid equals one process over 4 AdamW steps with clipping, each step at its own r with truncated backprop (gloo,
CPU, fp32). Grids that keep the whole batch together also draw the random initial state; grids that split the batch
start from s_0 = 0, since each of their ranks draws its own rows. A case with "loop": R checks a looped stack
instead (input injection, gradient through the last two passes, as the progressive loss runs it).

Entry point: check_recurrence_grids(rank, world, port, cases, out_path), started by torch.multiprocessing.spawn.
"""

from __future__ import annotations

import copy
import functools

import torch

from lora_grid_worker import _full_grads
from parallel_worker import GLOBAL_BATCH, MAX_NORM, SEQ, _max_error, run_cases
from tetra.model import ModelConfig, Transformer
from tetra.parallel.collectives import all_reduce
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.parallelize import (
    clip_global_grad_norm,
    full_state_dict,
    parallel_next_token_loss,
    parallelize,
    sync_gradients,
)
from tetra.train.losses import next_token_loss

SHAPE = dict(vocab_size=64, hidden_size=32, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=48,
             max_position_embeddings=32, recurrent_prelude=1, recurrent_core=2, recurrent_coda=1, mean_recurrence=4,
             backprop_depth=2)
LOOPED = dict(SHAPE, n_layers=2, recurrent_prelude=0, recurrent_core=0, recurrent_coda=0)
RECURRENCES = (3, 5, 1, 4)


def _check(shape: GridShape, loop: int = 0) -> dict:
    grid = ProcessGrid.build(shape)
    torch.manual_seed(0)
    reference = Transformer(ModelConfig(**(dict(LOOPED, loop=loop) if loop else SHAPE)))
    reference.init_weights(std=0.2)
    parallel = parallelize(copy.deepcopy(reference), grid)
    random_state = grid.size("batch") == 1 and not loop
    if not random_state and not loop:
        reference.recurrence.eval()
        parallel.recurrence.eval()
    tokens = torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
    labels = tokens[:, 1:].numel()

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3)

    ref_optimizer, par_optimizer = adamw(reference), adamw(parallel)
    result = {"grid": shape.__dict__, "loop": loop, "random_state": random_state, "norm_error": 0.0}
    for step, steps in enumerate(RECURRENCES):
        settings = dict(recurrence=steps, backprop_depth=min(steps, 2) if loop else None)
        torch.manual_seed(10 + step)
        ref_loss, _ = next_token_loss(functools.partial(reference, **settings), tokens)
        ref_loss.backward()
        torch.manual_seed(10 + step)
        loss, loss_sum = parallel_next_token_loss(functools.partial(parallel, **settings), local, grid, labels)
        loss.backward()
        sync_gradients(parallel, grid)
        if step == 0:
            global_loss = float(all_reduce(loss_sum.clone(), grid.groups["batch"])) / labels
            result["loss_error"] = abs(global_loss - ref_loss.item()) / ref_loss.item()
            ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
            par_grads = _full_grads(parallel, grid)
            result["grad_names_match"] = sorted(par_grads) == sorted(ref_grads)
            result["grad_error"] = _max_error(par_grads, ref_grads)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM))
        par_norm = clip_global_grad_norm(parallel, grid, MAX_NORM)
        result["norm_error"] = max(result["norm_error"], abs(par_norm - ref_norm) / ref_norm)
        for optimizer in (ref_optimizer, par_optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    result["param_error"] = _max_error(full_state_dict(parallel, grid),
                                       {n: p.detach() for n, p in reference.named_parameters()})
    return result


def check_recurrence_grids(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    """Every grid case against one process."""
    run_cases(lambda case: _check(GridShape(**{k: v for k, v in case.items() if k != "loop"}), case.get("loop", 0)),
              rank, world, port, [(case,) for case in cases], out_path)
