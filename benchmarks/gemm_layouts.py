"""GEMM layouts on this device: is X W^T (weight stored [out, in], torch's Linear) or X W (stored [in, out]) faster,
for the forward and the two backward GEMMs, at a model's weight shapes; and what the choice does to a training step.

Run: python benchmarks/gemm_layouts.py [--dtype bfloat16 --layers 4 --width 512 --batch 4 --seq 256]
     python benchmarks/gemm_layouts.py --device cuda --dtype bfloat16 --layers 16 --width 2048 --intermediate 5632 \
         --heads 32 --kv-heads 4 --vocab 32000 --seq 2048 --batch 4          (the ~1B Llama of the GPU check)
     python benchmarks/gemm_layouts.py --shapes 4096x4096 14336x4096 --batch 4 --seq 1024   (GEMMs only)
Part 1 prints, per weight block [out, in], each GEMM's time in both layouts, their sum, and the layout tetra's
parallel.gemm_layout = "auto" picks (the other one only when it wins by more than the 5% margin). Part 2 trains the
Llama-shaped model whose shapes these are (--layers, --width) through tetra's tensor-parallel layer on one process
with every weight [out, in], every weight [in, out], and each shape's pick, taking turns step by step, and prints
the median step times and ratios. The
picks are timed fresh here and not written to the cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from tetra.config import GoldfishConfig
from tetra.devices import synchronize
from tetra.model import ModelConfig, Transformer
from tetra.parallel.gemm_layout import (
    GEMM_LAYOUTS,
    IN_OUT,
    OUT_IN,
    best_seconds,
    device_fingerprint,
    forward_gemm,
    input_grad_gemm,
    pick,
    stored_shape,
    weight_grad_gemm,
)
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.launch import end_process_group, free_port
from tetra.parallel.parallelize import linear_block_shapes, parallelize
from tetra.train.replica import Replica


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=["bfloat16", "float32"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (tokens per GEMM: batch x seq)")
    parser.add_argument("--shapes", nargs="+", help="weight shapes out x in (default: the model's)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant (0: skip part 2)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.width, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, intermediate_size=args.intermediate, max_position_embeddings=args.seq)


def per_gemm_seconds(shape: tuple[int, int], tokens: int, dtype: torch.dtype, device: torch.device,
                     repeats: int) -> dict[str, dict[str, float]]:
    """GEMM name -> layout -> best seconds, as tensor_parallel's layer runs them."""
    x = torch.randn(tokens, shape[1], dtype=dtype, device=device)
    grad_y = torch.randn(tokens, shape[0], dtype=dtype, device=device)
    weights = {layout: torch.randn(stored_shape(shape, layout), dtype=dtype, device=device) for layout in GEMM_LAYOUTS}
    gemms = {"forward Y": lambda layout: forward_gemm(x, weights[layout], layout),
             "backward dX": lambda layout: input_grad_gemm(grad_y, weights[layout], layout),
             "backward dW": lambda layout: weight_grad_gemm(grad_y, x, layout)}
    return {name: best_seconds({layout: (lambda g=gemm, layout=layout: g(layout)) for layout in GEMM_LAYOUTS},
                               device, repeats)
            for name, gemm in gemms.items()}


def print_shapes(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype, device: torch.device,
                 repeats: int) -> dict[tuple[int, int], str]:
    print(f"{'block out x in':>15} {'GEMM':>12} {'[out,in] ms':>12} {'[in,out] ms':>12} {'ratio':>7}")
    picks = {}
    for shape in shapes:
        seconds = per_gemm_seconds(shape, tokens, dtype, device, repeats)
        for name, pair in seconds.items():
            print(f"{shape[0]:>7}x{shape[1]:<7} {name:>12} {1000 * pair[OUT_IN]:>12.3f} {1000 * pair[IN_OUT]:>12.3f} "
                  f"{pair[OUT_IN] / pair[IN_OUT]:>6.2f}x")
        total = {layout: sum(pair[layout] for pair in seconds.values()) for layout in GEMM_LAYOUTS}
        picks[shape] = pick(total)
        print(f"{shape[0]:>7}x{shape[1]:<7} {'all three':>12} {1000 * total[OUT_IN]:>12.3f} "
              f"{1000 * total[IN_OUT]:>12.3f} {total[OUT_IN] / total[IN_OUT]:>6.2f}x  -> {picks[shape]}")
    return picks


class TrainingStep:
    """A model whose Linears go through the tensor-parallel layer with the given layouts, and one timed step."""

    def __init__(self, config: ModelConfig, layouts: dict[tuple[int, int], str], args: argparse.Namespace,
                 device: torch.device, dtype: torch.dtype) -> None:
        grid = ProcessGrid.build(GridShape(1, 1, 1, 1))
        torch.manual_seed(0)
        model = Transformer(config)
        model.init_weights()
        self.model = parallelize(model.to(device), grid, gemm_layouts=layouts)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
        self.replica, self.device, self.dtype = Replica(grid), device, dtype

    def seconds(self) -> float:
        """One step: forward, backward, AdamW."""
        synchronize(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            self.replica.accumulate(self.model, [self.tokens], GoldfishConfig())
        self.replica.finish_backward(self.model, 1.0, self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start


def median_step_seconds(steps: dict[str, TrainingStep], count: int) -> dict[str, float]:
    """The variants take turns step by step (two warm-up rounds), so drift in the machine's speed hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(2 + count):
        for name, step in steps.items():
            seconds = step.seconds()
            if round_ >= 2:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = model_config(args)
    tokens = args.batch * args.seq
    grid = ProcessGrid.build(GridShape(1, 1, 1, 1))
    shapes = [tuple(map(int, text.split("x"))) for text in args.shapes] if args.shapes else \
        list(dict.fromkeys(linear_block_shapes(Transformer(config).to("meta"), grid)))
    print(f"{device_fingerprint(device)}; {args.dtype}; {tokens} tokens per GEMM")
    picks = print_shapes(shapes, tokens, dtype, device, args.repeats)
    if args.steps == 0 or args.shapes:
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)  # the layer's code path, with every group of size 1
    variants = {"all [out, in]": dict.fromkeys(shapes, OUT_IN), "all [in, out]": dict.fromkeys(shapes, IN_OUT),
                "auto picks": picks}
    print(f"\ntraining step: {config.num_parameters() / 1e6:.1f}M parameters ({args.layers} layers, width "
          f"{args.width}), batch {args.batch} x {args.seq}, one process")
    steps = {name: TrainingStep(config, layouts, args, device, dtype) for name, layouts in variants.items()}
    results = median_step_seconds(steps, args.steps)
    baseline = results["all [out, in]"]
    for name, seconds in results.items():
        print(f"{name:>14}: {1000 * seconds:9.1f} ms  {baseline / seconds:5.2f}x vs all [out, in]")
    end_process_group()


if __name__ == "__main__":
    main()
