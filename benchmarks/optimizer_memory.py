"""Optimizer state memory, step time and training curves of AdamW, GaLore (ranks 4..64) and Conda on the same model
and the same batches, interleaved step by step so every optimizer sees the same machine load.

Prints per optimizer: the bytes its state holds (and the ratio to AdamW's), the median step time (forward, backward
and update), the loss after the same number of steps, and the loss each had reached when the fastest finished
(equal time); writes the curves to a PNG.

Run: python benchmarks/optimizer_memory.py                      (a 4-block width-256 model, 300 steps, ~15 min)
     python benchmarks/optimizer_memory.py --steps 20 --width 64  (a quick look)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tetra.config import TrainConfig
from tetra.data.arithmetic import ArithmeticTask, write_arithmetic_data
from tetra.data.loader import PackedBatches
from tetra.data.shards import PreparedData
from tetra.model import ModelConfig, Transformer
from tetra.train.losses import next_token_loss
from tetra.train.optim import build_optimizer, lr_at, set_lr


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ranks", default="4,8,16,32,64", help="GaLore ranks")
    parser.add_argument("--interval", type=int, default=50, help="GaLore / Conda projection refresh interval")
    parser.add_argument("--out", default="benchmarks/out/optimizer_memory")
    return parser.parse_args()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def batches(args: argparse.Namespace, folder: Path) -> tuple[PackedBatches, int]:
    write_arithmetic_data(folder, ArithmeticTask("add"), max_digits=12, examples=args.steps * args.batch * 8)
    data = PreparedData.open(folder)
    return PackedBatches(data.split("train"), args.seq, args.batch, seed=0), data.vocab_size


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        loader, vocab = batches(args, Path(scratch) / "data")
        model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=args.width, n_layers=args.layers,
                                        n_heads=max(1, args.width // 64)))
        model.init_weights()
        base = dict(lr=args.lr, max_steps=args.steps, warmup_steps=max(1, args.steps // 20), weight_decay=0.0,
                    projection_interval=args.interval)
        settings = {"adamw": TrainConfig(**base)}
        settings.update({f"galore r={rank}": TrainConfig(**base, optimizer="galore", galore_rank=int(rank))
                         for rank in args.ranks.split(",")})
        settings["conda"] = TrainConfig(**base, optimizer="conda")
        runs = {}
        for name, config in settings.items():
            copy_of = copy.deepcopy(model)
            runs[name] = {"model": copy_of, "optimizer": build_optimizer(copy_of, config), "config": config,
                          "losses": [], "times": []}
        for step in range(args.steps):
            tokens = loader.batch(step)
            for run in runs.values():  # interleaved: the same batch, the same moment's machine load
                started = time.perf_counter()
                set_lr(run["optimizer"], lr_at(step, run["config"]))
                loss, _ = next_token_loss(run["model"], tokens)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(run["model"].parameters(), 1.0)
                run["optimizer"].step()
                run["optimizer"].zero_grad(set_to_none=True)
                run["times"].append(time.perf_counter() - started)
                run["losses"].append(loss.item())
    report(args, runs)
    return 0


def _smoothed(losses: list[float], window: int = 10) -> float:
    return statistics.fmean(losses[-window:])


def report(args: argparse.Namespace, runs: dict) -> None:
    adamw_bytes = state_bytes(runs["adamw"]["optimizer"])
    finish = min(sum(run["times"]) for run in runs.values())
    print(f"{args.layers} blocks of width {args.width}, {args.steps} steps of {args.batch} x {args.seq} tokens")
    print(f"{'optimizer':<14} {'state MB':>9} {'vs AdamW':>9} {'step ms':>8} {'loss@steps':>11} {'loss@time':>10}")
    table = {}
    for name, run in runs.items():
        elapsed, reached = 0.0, run["losses"][0]
        for seconds, index in zip(run["times"], range(len(run["losses"])), strict=True):
            elapsed += seconds
            if elapsed > finish:
                break
            reached = _smoothed(run["losses"][: index + 1])
        size = state_bytes(run["optimizer"])
        table[name] = {"state_bytes": size, "ratio": size / adamw_bytes, "step_ms": 1000 * statistics.median(
            run["times"]), "loss_at_steps": _smoothed(run["losses"]), "loss_at_equal_time": reached}
        row = table[name]
        print(f"{name:<14} {size / 1e6:>9.2f} {row['ratio']:>9.2f} {row['step_ms']:>8.1f} "
              f"{row['loss_at_steps']:>11.4f} {row['loss_at_equal_time']:>10.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "table": table}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        smooth = [_smoothed(run["losses"][: i + 1]) for i in range(len(run["losses"]))]
        by_step.plot(smooth, label=name)
        by_time.plot([sum(run["times"][: i + 1]) for i in range(len(smooth))], smooth, label=name)
    by_step.set_xlabel("step")
    by_time.set_xlabel("seconds")
    for axis in (by_step, by_time):
        axis.set_ylabel("training loss (10-step mean)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "optimizer_curves.png", dpi=110)
    print(f"wrote {out / 'optimizer_curves.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
