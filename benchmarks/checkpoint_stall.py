"""How long a training step waits for a checkpoint: synchronous saves against asynchronous ones (run.async_checkpoint),
same process, interleaved.

Run: python benchmarks/checkpoint_stall.py [--layers 8 --width 512 --vocab 16384 --rounds 4]
Each round trains a few steps, saves (timing how long save() blocks the loop), then keeps training until the save is
on disk, timing those steps against steps with no save in flight: the background write is not free where it shares
the cores with training. Prints the stall of each mode, the write time, the overlapped steps per save and their
slowdown, and the net cost of one save to the run (the wait plus the time the overlapped steps lose).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tetra.config import TrainConfig
from tetra.model import ModelConfig, Transformer
from tetra.train.checkpoint_write import CheckpointTarget
from tetra.train.checkpointer import Checkpointer
from tetra.train.optim import build_optimizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="saves per mode")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, n_layers=args.layers, n_heads=8,
                         n_kv_heads=4, intermediate_size=int(2.75 * args.width), max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    optimizer = build_optimizer(model, TrainConfig(), None)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))

    def step() -> float:
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # optimizer state exists from here
    results: dict[str, dict[str, list[float]]] = {mode: {"stall": [], "write": [], "overlapped": [], "plain": []}
                                                  for mode in ("sync", "async")}
    with tempfile.TemporaryDirectory() as scratch:
        savers = {mode: Checkpointer(CheckpointTarget(Path(scratch) / mode, "", None, keep=1), model, optimizer,
                                     None, replicated=False, asynchronous=mode == "async")
                  for mode in ("sync", "async")}
        for round_index in range(args.rounds):
            for mode, saver in savers.items():
                timing = results[mode]
                timing["plain"] += [step() for _ in range(3)]
                start = time.perf_counter()
                saver.save(round_index + 1, {})
                timing["stall"].append(time.perf_counter() - start)
                while saver.writing:
                    timing["overlapped"].append(step())
                saver.wait()
                timing["write"].append(time.perf_counter() - start)
        checkpoint_bytes = sum(f.stat().st_size for f in (Path(scratch) / "sync").rglob("*") if f.is_file())
    print(f"model: {config.num_parameters() / 1e6:.1f}M parameters; checkpoint {checkpoint_bytes / 2**20:.0f} MiB "
          f"(weights + AdamW state); {torch.get_num_threads()} threads")
    plain = statistics.median(results["sync"]["plain"] + results["async"]["plain"])
    print(f"a step with no save in flight: {plain * 1000:.0f} ms (median)")
    print(f"{'mode':<6} {'step waits (ms)':>16} {'save done after (ms)':>21} {'overlapped steps':>17} "
          f"{'their slowdown':>15} {'net cost per save (ms)':>23}")
    for mode, timing in results.items():
        overlapped = timing["overlapped"]
        slowdown = f"{statistics.median(overlapped) / plain:.2f}x" if overlapped else "-"
        # what a save adds to the run: the wait, plus what the steps beside a background write lose
        net = (sum(timing["stall"]) + sum(overlapped) - plain * len(overlapped)) / args.rounds
        print(f"{mode:<6} {statistics.median(timing['stall']) * 1000:>16.0f} "
              f"{statistics.median(timing['write']) * 1000:>21.0f} {len(overlapped) / args.rounds:>17.1f} "
              f"{slowdown:>15} {net * 1000:>23.0f}")
    ratio = statistics.median(results["sync"]["stall"]) / statistics.median(results["async"]["stall"])
    print(f"the loop waits {ratio:.1f}x less with asynchronous saves")


if __name__ == "__main__":
    main()
