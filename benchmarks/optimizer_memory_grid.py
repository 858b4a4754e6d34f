"""Optimizer state per rank on the 4D grid: AdamW, GaLore and Conda on the same model, one process against grids that
split the matrices (depth, row x col, depth x row), with the step time of each on its grid.

For each grid and optimizer: the largest state any rank holds (bytes of every state tensor: moments, projectors,
bases), its share of the one-process state, and the median time of a training step (forward, backward, gradient
sums, clipping and the update; a refresh of the projection every `--interval` steps included), against AdamW on
the same grid. gloo processes on CPU, one thread each.

Run: python benchmarks/optimizer_memory_grid.py                       (width 256, 4 blocks, 12 steps per cell)
     python benchmarks/optimizer_memory_grid.py --width 128 --steps 6  (a quick look)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from optimizer_memory import state_bytes
from tetra.config import TrainConfig
from tetra.model import ModelConfig, Transformer
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.launch import end_process_group, spawn_collect
from tetra.parallel.parallelize import clip_global_grad_norm, parallel_next_token_loss, parallelize, sync_gradients
from tetra.train.losses import next_token_loss
from tetra.train.optim import build_optimizer

GRIDS = {"depth 4": dict(depth=4), "row 2 x col 2": dict(row=2, col=2), "depth 2 x row 2": dict(depth=2, row=2)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16, help="GaLore's rank")
    parser.add_argument("--interval", type=int, default=4, help="steps between refreshes (small: they are timed)")
    return parser.parse_args()


def _configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    common = dict(lr=1e-3, projection_interval=args.interval, precision="fp32")
    return {"adamw": TrainConfig(**common), f"galore r={args.rank}": TrainConfig(optimizer="galore",
                                                                               galore_rank=args.rank, **common),
            "conda": TrainConfig(optimizer="conda", **common)}


def _model(args: argparse.Namespace) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=args.vocab, hidden_size=args.width, n_layers=args.layers,
                                    n_heads=max(args.width // 32, 2), intermediate_size=4 * args.width,
                                    max_position_embeddings=args.seq))
    model.init_weights()
    return model


def _tokens(args: argparse.Namespace, step: int) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(step))


def _one_process(args: argparse.Namespace) -> dict[str, int]:
    """The one-process state of each optimizer after a step (its bytes do not change afterwards)."""
    sizes = {}
    for name, config in _configs(args).items():
        model = _model(args)
        optimizer = build_optimizer(model, config)
        next_token_loss(model, _tokens(args, 0))[0].backward()
        optimizer.step()
        sizes[name] = state_bytes(optimizer)
    return sizes


def _worker(rank: int, world: int, port: int, args_json: str, out_path: str) -> None:
    args = argparse.Namespace(**json.loads(args_json))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        base = _model(args)
        for grid_name, shape in GRIDS.items():
            grid = ProcessGrid.build(GridShape(**shape))
            for name, config in _configs(args).items():
                model = parallelize(copy.deepcopy(base), grid)
                optimizer = build_optimizer(model, config, grid)
                times = []
                for step in range(args.steps):
                    tokens = _tokens(args, step)
                    local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
                    dist.barrier()
                    start = time.perf_counter()
                    loss, _ = parallel_next_token_loss(model, local, grid, tokens[:, 1:].numel())
                    loss.backward()
                    sync_gradients(model, grid)
                    clip_global_grad_norm(model, grid, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    times.append(time.perf_counter() - start)
                largest = torch.tensor([state_bytes(optimizer)])
                dist.all_reduce(largest, op=dist.ReduceOp.MAX)
                results[f"{grid_name}/{name}"] = {"bytes": int(largest), "step_s": statistics.median(times[1:])}
                schedule = getattr(model, "comm_schedule", None)
                if schedule is not None:  # no overlapped collective left in flight before the next model
                    schedule.finish()
        if rank == 0:
            with open(out_path, "w") as handle:
                json.dump(results, handle)
    finally:
        end_process_group()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    whole = _one_process(args)
    results = spawn_collect(_worker, 4, json.dumps(vars(args)))
    print(f"model: width {args.width}, {args.layers} blocks, vocab {args.vocab}; batch {args.batch} x {args.seq}; "
          f"4 gloo processes of one thread; refresh every {args.interval} steps")
    print(f"{'grid':<16} {'optimizer':<12} {'state/rank':>11} {'of 1 proc':>10} {'step':>9} {'vs AdamW':>9}")
    for grid_name in GRIDS:
        adamw_time = results[f"{grid_name}/adamw"]["step_s"]
        for name in _configs(args):
            cell = results[f"{grid_name}/{name}"]
            print(f"{grid_name:<16} {name:<12} {cell['bytes'] / 1e6:>9.2f}MB {cell['bytes'] / whole[name]:>10.2f} "
                  f"{cell['step_s'] * 1e3:>7.1f}ms {cell['step_s'] / adamw_time:>9.2f}")
    print("one process: " + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in whole.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
