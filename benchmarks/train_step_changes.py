"""What each CPU training-step technique is worth: two identical tetra loops in one process take turns step by step,
and one of them runs with one technique switched back to the plain form; the ratio is the plain loop's median step
time over the full loop's (> 1: the technique pays).

Run: python benchmarks/train_step_changes.py [--steps 16] [--only loss norm attention rotary]
Same model and batches as benchmarks/train_throughput.py (Llama shape, 6 layers, width 384, vocabulary 8192, batch
8 x 256, bf16 autocast on CPU). The plain forms are the code paths tetra itself keeps for other cases:
- loss: the chunked loss recomputing softmax - onehot in backward (stored_bytes=0) instead of keeping it;
- norm: torch's rms_norm plus the projection's autocast cast instead of the training RMSNorm function;
- attention: torch SDPA (bf16 forward and backward) instead of the fp32 flash backward;
- rotary: the inference rotary (mixed-dtype products) instead of the training form.
Both loops start from the same weights and batches; the largest parameter difference after the run is printed
(0 means the technique is bit-identical, small values are the rounding it changes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tetra.model.kv_cache as kv_cache
import tetra.model.layers as layers
import tetra.train.replica as replica
from tetra.config import build_run_config
from tetra.train.chunked_loss import chunked_token_loss
from tetra.train.loop import build_loop
from train_throughput import make_dataset

_TRAINING_NORM = layers.RMSNorm.forward


def _plain_norm(self: layers.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """torch's rms_norm for fp32 input (the projections' autocast then casts), as inference runs it."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
    return _TRAINING_NORM(self, x)  # other dtypes never took the training function


PLAIN_FORMS = {
    "loss": [(replica, "chunked_token_loss", functools.partial(chunked_token_loss, stored_bytes=0))],
    "norm": [(layers.RMSNorm, "forward", _plain_norm)],
    "attention": [(kv_cache, "training_attention", lambda *args: None)],
    "rotary": [(layers, "_rotate_for_training", layers._rotate)],
}


@contextlib.contextmanager
def patched(replacements: list[tuple[object, str, object]]):
    """Swap attributes for the duration of one step, then put the originals back."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per loop (after 3 warm-up steps)")
    parser.add_argument("--only", nargs="+", choices=list(PLAIN_FORMS), default=list(PLAIN_FORMS))
    return parser.parse_args()


def compare(data: Path, scratch: Path, technique: str, steps: int) -> tuple[float, float, float]:
    """(full loop's median step seconds, plain loop's, largest parameter difference at the end)."""
    model_keys = {"hidden_size": 384, "n_layers": 6, "n_heads": 6, "intermediate_size": 1024,
                  "max_position_embeddings": 256}
    loops = []
    for name in ("full", "plain"):
        config = build_run_config({
            "model": model_keys, "data": {"path": str(data), "seq_len": 256},
            "train": {"batch_size": 8, "max_steps": 1000, "warmup_steps": 10, "precision": "auto"},
            "run": {"dir": str(scratch / f"{technique}-{name}"), "device": "cpu"}})
        loops.append(build_loop(config, model_keys)[0])
    seconds: dict[str, list[float]] = {"full": [], "plain": []}
    for index in range(3 + steps):
        order = [("full", loops[0], []), ("plain", loops[1], PLAIN_FORMS[technique])]
        for name, loop, replacements in order if index % 2 == 0 else reversed(order):
            with patched(replacements):
                start = time.perf_counter()
                loop.step(index)
                if index >= 3:
                    seconds[name].append(time.perf_counter() - start)
    difference = max((a - b).abs().max().item()
                     for a, b in zip(loops[0].model.parameters(), loops[1].model.parameters(), strict=True))
    return statistics.median(seconds["full"]), statistics.median(seconds["plain"]), difference


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = make_dataset(Path(scratch), 8192)
        print(f"{'technique':<10} {'full ms':>8} {'plain ms':>9} {'plain / full':>13} {'max param diff':>15}")
        for technique in args.only:
            full, plain, difference = compare(data, Path(scratch), technique, args.steps)
            print(f"{technique:<10} {full * 1e3:>8.1f} {plain * 1e3:>9.1f} {plain / full:>12.3f}x {difference:>15.2e}")


if __name__ == "__main__":
    main()
