"""The same model and global batch trained on N gloo processes with torch DDP, torch FSDP2 (fully_shard) and tetra's
4D grids: step time and memory per rank, with ratios against FSDP2 and DDP.

Run: python benchmarks/strategies.py [--world 4 --layers 4 --width 512 --seq 128 --batch 8 --steps 4]
Each configuration runs in fresh processes, so its peak resident memory is its own. Memory is reported two ways:
the exact bytes of parameters + gradients + optimizer state a rank holds, and the growth of the process's peak RSS
from just before the model is built (activations and communication buffers included).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from step_timing import peak_rss_mb, time_steps
from tetra.config import TrainConfig
from tetra.model import ModelConfig, Transformer
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.launch import end_process_group, spawn_collect
from tetra.parallel.parallelize import parallelize
from tetra.train.optim import build_optimizer
from tetra.train.replica import Replica
from tetra.train.torch_strategies import wrap_model

# regather: depth blocks gathered again in backward instead of kept from forward (parallel.regather=true).
GRIDS = [dict(depth=4), dict(depth=4, regather=True), dict(data=2, depth=2), dict(depth=2, row=2), dict(row=2, col=2),
         dict(data=4)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=4)
    return parser.parse_args()


def worker(rank: int, world: int, port: int, args: argparse.Namespace, strategy: str, grid_sizes: dict,
           out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shape = GridShape.infer(world, **{name: grid_sizes.get(name, 0) for name in ("data", "depth", "row", "col")})
    grid = ProcessGrid.build(shape)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, n_layers=args.layers, n_heads=args.heads,
                         n_kv_heads=args.heads // 2, intermediate_size=int(2.75 * args.width),
                         max_position_embeddings=args.seq)
    rss_before = peak_rss_mb()
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    replica = Replica(grid, strategy=strategy)
    if strategy == "4d":
        parallelize(model, grid, regather=grid_sizes.get("regather", False))
    forward_model = wrap_model(model, strategy, torch.device("cpu"))
    optimizer = build_optimizer(model, TrainConfig(), grid if strategy == "4d" else None)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
    seconds, held = time_steps(forward_model, replica, optimizer, list(local.chunk(args.accumulation)), args.steps)
    result = torch.tensor([held / 2**20, peak_rss_mb() - rss_before])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)  # the most loaded rank
    if rank == 0:
        import json

        with open(out_path, "w") as handle:
            json.dump({"strategy": strategy, "grid": vars(shape), "regather": grid_sizes.get("regather", False),
                       "step_ms": 1000 * seconds,
                       "state_mb": float(result[0]), "rss_growth_mb": float(result[1]),
                       "parameters": config.num_parameters()}, handle)
    end_process_group(model)


def label(row: dict) -> str:
    if row["strategy"] != "4d":
        return row["strategy"]
    grid = "4d " + " x ".join(f"{name} {size}" for name, size in row["grid"].items() if size > 1)
    return grid + " (regather)" if row["regather"] else grid


def main() -> None:
    args = parse_args()
    rows = [spawn_collect(worker, args.world, args, strategy, {"data": args.world})
            for strategy in ("ddp", "fsdp2")]
    rows += [spawn_collect(worker, args.world, args, "4d", grid) for grid in GRIDS]
    fsdp2, ddp = rows[1], rows[0]
    print(f"model: {rows[0]['parameters'] / 1e6:.1f}M parameters ({args.layers} layers, width {args.width}, vocab "
          f"{args.vocab}); global batch {args.batch} x {args.seq} in {args.accumulation} micro-batches; "
          f"{args.world} gloo processes on {os.cpu_count()} cores")
    print(f"{'strategy':<24} {'step ms':>8} {'vs fsdp2':>9} {'vs ddp':>7} {'state MB/rank':>14} {'vs fsdp2':>9} "
          f"{'peak RSS growth MB':>19}")
    for row in rows:
        print(f"{label(row):<24} {row['step_ms']:>8.0f} {fsdp2['step_ms'] / row['step_ms']:>8.2f}x "
              f"{ddp['step_ms'] / row['step_ms']:>6.2f}x {row['state_mb']:>14.1f} "
              f"{row['state_mb'] / fsdp2['state_mb']:>8.2f}x {row['rss_growth_mb']:>19.0f}")
    print("speed ratios: > 1 = faster than the baseline; memory ratio: < 1 = less than FSDP2")


if __name__ == "__main__":
    main()
