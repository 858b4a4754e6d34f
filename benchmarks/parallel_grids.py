"""Every valid 4D grid of a small model on N gloo processes: step time and bytes each rank moves per step.

Run: python benchmarks/parallel_grids.py [--world 4 --layers 2 --width 128 --seq 128 --batch 8 --steps 5]
     python benchmarks/parallel_grids.py --compare-overlap     (each grid with overlapped and blocking collectives)
Steps go through the trainer's Replica (bucketed data-parallel sums, overlapped collectives unless compared).
Bytes use ring costs (all-reduce 2(G-1)/G x message, all-gather (G-1)/G x result); gloo has no reduce-scatter,
so tetra runs it as an all-reduce there and it is counted as one. The performance planner builds on this table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from step_timing import time_steps
from tetra.model import ModelConfig, Transformer
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.launch import end_process_group, spawn_collect
from tetra.parallel.parallelize import parallelize
from tetra.parallel.planner import valid_grids
from tetra.train.replica import Replica


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--regather", action="store_true",
                        help="gather depth-sharded weight blocks again in backward (parallel.regather=true)")
    parser.add_argument("--compare-overlap", action="store_true",
                        help="also time each grid with blocking collectives (parallel.overlap=false)")
    return parser.parse_args()


class ByteCounter:
    """Wraps torch.distributed's collectives in this process to add up the bytes a ring algorithm moves."""

    def __init__(self) -> None:
        self.bytes = 0
        self.original = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}
        dist.all_reduce = self._all_reduce
        dist.all_gather = self._all_gather

    def _all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        size = dist.get_world_size(group)
        self.bytes += 2 * (size - 1) / size * tensor.numel() * tensor.element_size()
        return self.original["all_reduce"](tensor, op=op, group=group, async_op=async_op)

    def _all_gather(self, tensors, tensor, group=None, async_op=False):
        size = dist.get_world_size(group)
        self.bytes += (size - 1) / size * size * tensor.numel() * tensor.element_size()
        return self.original["all_gather"](tensors, tensor, group=group, async_op=async_op)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, n_layers=args.layers, n_heads=args.heads,
                         intermediate_size=4 * args.width, max_position_embeddings=args.seq)
    counter = ByteCounter()
    rows = []
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    for shape in valid_grids(config, world, args.batch):
        grid = ProcessGrid.build(shape)
        local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
        row = {"grid": vars(shape)}
        for overlap in (True, False) if args.compare_overlap else (True,):
            torch.manual_seed(0)
            model = Transformer(config)
            model.init_weights()
            parallelize(model, grid, overlap=overlap, regather=args.regather)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            start_bytes = counter.bytes
            seconds, _ = time_steps(model, Replica(grid), optimizer, list(local.chunk(args.accumulation)),
                                    args.steps)
            per_rank_bytes = torch.tensor([(counter.bytes - start_bytes) / (args.steps + 2)])
            dist.all_reduce(per_rank_bytes)
            row["step_ms" if overlap else "blocking_step_ms"] = 1000 * seconds
            row.update(mbytes_per_rank=float(per_rank_bytes) / world / 1e6,
                       params_per_rank=sum(p.numel() for p in model.parameters()))
        rows.append(row)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(rows, handle)
    end_process_group()


def measure_grids(args: argparse.Namespace) -> list[dict]:
    """Step time, bytes and parameters per rank of every valid grid, fastest first."""
    return sorted(spawn_collect(worker, args.world, args), key=lambda r: r["step_ms"])


def main() -> None:
    args = parse_args()
    rows = measure_grids(args)
    print(f"model: {args.layers} layers, width {args.width}, vocab {args.vocab}; global batch {args.batch} x "
          f"{args.seq}; {args.world} gloo processes on {os.cpu_count()} cores")
    overlap = args.compare_overlap
    print(f"{'data':>4} {'depth':>5} {'row':>3} {'col':>3} {'step ms':>9}"
          + (f" {'blocking ms':>12} {'gain':>6}" if overlap else "") + f" {'MB/rank/step':>13} {'params/rank':>12}")
    for row in rows:
        g = row["grid"]
        gain = f" {row['blocking_step_ms']:>12.1f} {row['blocking_step_ms'] / row['step_ms']:>5.2f}x" if overlap else ""
        print(f"{g['data']:>4} {g['depth']:>5} {g['row']:>3} {g['col']:>3} {row['step_ms']:>9.1f}{gain} "
              f"{row['mbytes_per_rank']:>13.2f} {row['params_per_rank']:>12,}")


if __name__ == "__main__":
    main()
