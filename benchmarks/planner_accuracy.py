"""Does the performance model rank grids like reality? Calibrates this machine, measures every valid grid of a small
model on N gloo processes (benchmarks/parallel_grids.py), and compares with `tetra plan`'s predictions.

Run: python benchmarks/planner_accuracy.py [--world 4 --layers 2 --width 128 --seq 128 --batch 8]
Prints predicted vs measured step time per grid, the Spearman rank correlation (target >= 0.8), and how much slower
the predicted-best grid is than the measured best (target within 10%). The runs are fp32, so the fp32 GEMM
throughput each process sustains while all compute is used and 4-byte values are counted.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from parallel_grids import measure_grids, parse_args  # noqa: E402
from tetra.model import ModelConfig  # noqa: E402
from tetra.parallel.calibrate import calibrate  # noqa: E402
from tetra.parallel.grid import GridShape  # noqa: E402
from tetra.parallel.planner import MachineProfile, predict  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def main() -> None:
    args = parse_args()
    measured_profile = calibrate(args.world, torch.device("cpu"))
    # fp32 runs: the fp32 GEMM throughput each process sustains while all of them compute
    fp32_gemm = measured_profile["step_costs"]["concurrent_gemm_flops_float32"]
    machine = dataclasses.replace(MachineProfile(**measured_profile["profile"]), gemm_flops=fp32_gemm)
    rows = measure_grids(args)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, n_layers=args.layers, n_heads=args.heads,
                         intermediate_size=4 * args.width, max_position_embeddings=args.seq)
    for row in rows:
        shape = GridShape(**row["grid"])
        # each batch rank runs its sequences as args.accumulation micro-batches, as parallel_grids measured them
        micro_batch = max(args.batch // (shape.data * shape.depth * args.accumulation), 1)
        row["predicted_ms"] = 1000 * predict(config, shape, args.batch, args.seq, machine, micro_batch=micro_batch,
                                             value_bytes=4, regather=args.regather).step_time
    latencies = ", ".join(f"{seconds * 1e6:.0f} us on {size}" for size, seconds in machine.collective_latency_by_group)
    print(f"machine: {machine.gemm_flops / 1e9:.0f} GFLOP/s fp32 GEMM, {machine.intra_node_bandwidth / 1e9:.2f} GB/s "
          f"all-reduce bus bandwidth, latency {latencies}, "
          f"{machine.overlap_efficiency:.0%} overlap efficiency, {machine.memory_bandwidth / 1e9:.1f} GB/s memory, "
          f"{machine.layer_overhead * 1e3:.2f} ms per layer and {machine.step_overhead * 1e3:.2f} ms per step fixed "
          f"({args.world} gloo processes on {os.cpu_count()} cores)")
    print(f"{'data':>4} {'depth':>5} {'row':>3} {'col':>3} {'measured ms':>12} {'predicted ms':>13}")
    for row in rows:
        g = row["grid"]
        print(f"{g['data']:>4} {g['depth']:>5} {g['row']:>3} {g['col']:>3} {row['step_ms']:>12.1f} "
              f"{row['predicted_ms']:>13.1f}")
    correlation = spearman([r["step_ms"] for r in rows], [r["predicted_ms"] for r in rows])
    predicted_best = min(rows, key=lambda r: r["predicted_ms"])
    gap = predicted_best["step_ms"] / rows[0]["step_ms"] - 1
    print(f"Spearman rank correlation: {correlation:.2f} (target >= 0.8)")
    print(f"predicted-best grid {predicted_best['grid']} is {gap:.1%} slower than the measured best (target <= 10%)")


if __name__ == "__main__":
    main()
