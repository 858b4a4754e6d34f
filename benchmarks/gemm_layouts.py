"""GEMM layouts: is X W^T (weight stored [out, in], torch's Linear) or X W (weight stored [in, out]) faster, for the
forward and the two backward GEMMs, at a model's weight shapes? The storage layout of the tensor-parallel Linear can
follow the answer; this script measures it on the current device.

Run: python benchmarks/gemm_layouts.py [--tokens 2048 --dtype bfloat16 --shapes 4096x4096 14336x4096 4096x14336]
Prints, per weight shape [out, in], the time of each GEMM in each layout and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of X (batch x sequence per rank)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "2816x1024", "1024x2816", "4096x1024"],
                        help="weight shapes out x in")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def seconds(function, device: str, repeats: int = 5) -> float:
    """Best of `repeats`: other processes only ever make a run slower."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def layout_pairs(x: torch.Tensor, grad_y: torch.Tensor, w: torch.Tensor) -> dict:
    """Each GEMM of a Linear, computed with W stored [out, in] and with W stored [in, out]."""
    w_t = w.t().contiguous()  # [in, out]
    return {
        "forward Y": (lambda: x @ w.t(), lambda: x @ w_t),
        "backward dX": (lambda: grad_y @ w, lambda: grad_y @ w_t.t()),
        # dW in the storage layout: [out, in] = dY^T X, or [in, out] = X^T dY
        "backward dW": (lambda: grad_y.t() @ x, lambda: x.t() @ grad_y),
    }


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{args.device}, {args.dtype}, {args.tokens} tokens, {torch.get_num_threads()} threads; ms per GEMM "
          "(W stored [out,in] as torch.nn.Linear vs [in,out])")
    print(f"{'shape out x in':>15} {'GEMM':>14} {'[out,in] ms':>12} {'[in,out] ms':>12} {'ratio':>7}")
    for text in args.shapes:
        out_features, in_features = map(int, text.split("x"))
        x = torch.randn(args.tokens, in_features, dtype=dtype, device=args.device)
        grad_y = torch.randn(args.tokens, out_features, dtype=dtype, device=args.device)
        w = torch.randn(out_features, in_features, dtype=dtype, device=args.device)  # [out, in]
        for name, (stored, transposed) in layout_pairs(x, grad_y, w).items():
            a, b = seconds(stored, args.device), seconds(transposed, args.device)
            print(f"{text:>15} {name:>14} {1000 * a:>12.2f} {1000 * b:>12.2f} {a / b:>6.2f}x")


if __name__ == "__main__":
    main()
