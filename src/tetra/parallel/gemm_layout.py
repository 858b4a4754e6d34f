"""Which way round a tensor-parallel Linear stores its weight block: [out, in] (Y = X W^T, as torch.nn.Linear) or
[in, out] (Y = X W). Both compute the same three GEMMs (forward, input gradient, weight gradient), but BLAS libraries
and GPU kernels run transposed operands at different speeds for some shapes, so the layout is timed once per device,
dtype, weight shape and token count, and the answer is kept in a cache file.

Entry points: OUT_IN, IN_OUT, forward_gemm / input_grad_gemm / weight_grad_gemm (what the layer runs),
best_seconds, time_layouts, LayoutCache, choose_layouts, agree_on_layouts, device_fingerprint, default_cache_path.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tetra.devices import synchronize, timing_input

OUT_IN, IN_OUT = "out_in", "in_out"
GEMM_LAYOUTS = (OUT_IN, IN_OUT)
# A layout must be this much faster than torch's own [out, in] to be used: smaller differences are within the
# run-to-run noise of one timing, and flipping on noise would only change rounding from run to run.
DEFAULT_MARGIN = 0.05
CACHE_VERSION = 1

Shape = tuple[int, int]  # a weight block's (out_features, in_features)


def stored_shape(shape: Shape, layout: str) -> Shape:
    return shape if layout == OUT_IN else (shape[1], shape[0])


def forward_gemm(x: torch.Tensor, weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Y [..., out] from X [..., in] and the stored weight."""
    return F.linear(x, weight) if layout == OUT_IN else x.matmul(weight)


def input_grad_gemm(grad_y: torch.Tensor, weight: torch.Tensor, layout: str) -> torch.Tensor:
    """dX [..., in] = dY W, with W [out, in] read from the stored weight."""
    return grad_y.matmul(weight if layout == OUT_IN else weight.t())


def weight_grad_gemm(grad_y: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """The weight gradient in the stored layout: dY^T X [out, in] or X^T dY [in, out] (rows: every token)."""
    grad_y, x = grad_y.flatten(0, -2), x.flatten(0, -2)
    return grad_y.t().matmul(x) if layout == OUT_IN else x.t().matmul(grad_y)


def best_seconds(functions: dict[str, Callable[[], object]], device: torch.device,
                 repeats: int = 5) -> dict[str, float]:
    """Best of `repeats` seconds for each function, the functions taking turns, so that a slow moment of the
    machine (other processes only ever slow a run down) favours none of them. One untimed warm-up call each."""
    for function in functions.values():
        function()
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def time_layouts(shape: Shape, tokens: int, dtype: torch.dtype, device: torch.device,
                 repeats: int = 5) -> dict[str, float]:
    """Seconds for one Linear's three GEMMs (forward, input gradient, weight gradient) in each layout."""
    out_features, in_features = shape
    x = timing_input(tokens, in_features, dtype=dtype, device=device)
    grad_y = timing_input(tokens, out_features, dtype=dtype, device=device)

    def step(layout: str) -> Callable[[], None]:
        weight = timing_input(*stored_shape(shape, layout), dtype=dtype, device=device)

        def run() -> None:
            forward_gemm(x, weight, layout)
            input_grad_gemm(grad_y, weight, layout)
            weight_grad_gemm(grad_y, x, layout)

        return run

    return best_seconds({layout: step(layout) for layout in GEMM_LAYOUTS}, device, repeats)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(device: torch.device) -> str:
    """What the timing depends on: the device model (and CPU threads), and the torch build with its BLAS."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    else:
        name = f"{_cpu_name()} x{torch.get_num_threads()} threads"
    return f"{device.type}: {name}, torch {torch.__version__}"


def default_cache_path() -> Path:
    """$TETRA_CACHE_DIR, else $XDG_CACHE_HOME/tetra, else ~/.cache/tetra; the file gemm_layouts.json in it."""
    folder = os.environ.get("TETRA_CACHE_DIR")
    if not folder:
        folder = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tetra")
    return Path(folder) / "gemm_layouts.json"


@dataclass
class LayoutCache:
    """Timings already taken, keyed by device fingerprint, dtype, weight shape and tokens. The file is derived
    data: an unreadable one is reported and replaced, never a reason to stop a run."""

    path: Path | None
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> LayoutCache:
        cache = cls(path)
        if path is None or not path.is_file():
            return cache
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
            cache.entries = data["entries"]
        except (OSError, ValueError, AttributeError) as error:
            sys.stderr.write(f"Warning: the GEMM layout cache {path} is unreadable ({error}); the layouts are timed "
                             "again and the file is rewritten.\n")
        return cache

    @staticmethod
    def key(fingerprint: str, dtype: torch.dtype, shape: Shape, tokens: int) -> str:
        return f"{fingerprint} | {str(dtype).removeprefix('torch.')} | {shape[0]}x{shape[1]} | {tokens} tokens"

    def save(self) -> None:
        """Write atomically (a temporary file renamed into place): parallel runs may share the file."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=".gemm_layouts.", dir=self.path.parent)
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump({"version": CACHE_VERSION, "entries": self.entries}, stream, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except OSError as error:
            sys.stderr.write(f"Warning: could not write the GEMM layout cache {self.path} ({error}); the layouts "
                             "will be timed again next time.\n")


@dataclass
class LayoutChoice:
    """The layout used for one weight shape, and the timings it was chosen from."""

    layout: str
    seconds: dict[str, float]
    cached: bool

    @property
    def speedup(self) -> float:
        """How much faster the chosen layout is than [out, in] (1.0 when [out, in] is kept)."""
        return self.seconds[OUT_IN] / self.seconds[self.layout]


def pick(seconds: dict[str, float], margin: float = DEFAULT_MARGIN) -> str:
    """[in, out] only when it beats [out, in] by more than the margin."""
    return IN_OUT if seconds[IN_OUT] * (1 + margin) < seconds[OUT_IN] else OUT_IN


def choose_layouts(shapes: Iterable[Shape], tokens: int, dtype: torch.dtype, device: torch.device,
                   cache: LayoutCache, margin: float = DEFAULT_MARGIN,
                   timer: Callable[..., dict[str, float]] = time_layouts) -> dict[Shape, LayoutChoice]:
    """The layout for each distinct weight shape: from the cache, or timed now and added to it."""
    fingerprint = device_fingerprint(device)
    choices: dict[Shape, LayoutChoice] = {}
    timed = False
    for shape in dict.fromkeys(tuple(shape) for shape in shapes):
        key = LayoutCache.key(fingerprint, dtype, shape, tokens)
        entry = cache.entries.get(key)
        if isinstance(entry, dict) and set(entry.get("seconds", {})) == set(GEMM_LAYOUTS):
            seconds, cached = {layout: float(entry["seconds"][layout]) for layout in GEMM_LAYOUTS}, True
        else:
            seconds, cached, timed = timer(shape, tokens, dtype, device), False, True
            cache.entries[key] = {"seconds": seconds}
        choices[shape] = LayoutChoice(pick(seconds, margin), seconds, cached)
    if timed:
        cache.save()
    return choices


def agree_on_layouts(choices: dict[Shape, str] | None) -> dict[Shape, str]:
    """Rank 0's choices on every rank (collective over the default group): ranks that share a weight block must
    store it the same way, and separate timings could disagree."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(choices or {})
    message = [sorted(choices.items()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(message, src=0)
    return {tuple(shape): layout for shape, layout in message[0]}
