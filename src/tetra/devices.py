"""Device and dtype choice from the environment: CUDA when present, else CPU; bf16 on GPUs, fp32 on CPUs.

Entry points: resolve_device(name), resolve_dtype(name, device), synchronize(device),
measured_gemm_flops(dtype, device), this device's practical GEMM peak, timing_input(...) for such measurements, and
keep_freed_memory(device) for CPU training.
"""

from __future__ import annotations

import ctypes
import sys
import time

import torch

from tetra.errors import ConfigError

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} was asked for, but no CUDA device is visible. Use cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Device {name!r} is not a device name; use auto, cpu, cuda or cuda:N.") from None


# glibc's mallopt parameters and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory(device: torch.device) -> bool:
    """Have glibc keep freed CPU memory for reuse instead of handing it back to the OS. A training step allocates
    and frees the same activation buffers every step; by default glibc returns large freed blocks (and the top of
    its heap) to the kernel, and each reuse touches fresh pages: 20-60 thousand page faults and 65-100 ms of kernel
    time per step of benchmarks/train_throughput.py's model, about 7% of it. Blocks under 32 MiB (the largest
    threshold glibc allows; tetra's chunked loss keeps its buffers under 8 MiB) then come from a heap that is never
    trimmed, so the process holds its peak memory. Process-wide; returns False where it does not apply (GPUs,
    other C libraries)."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no such tuning)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPUs, which run eagerly), so that a timer reads real time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """'auto' is bf16 on GPUs and fp32 on CPUs; 'keep' (None) leaves the stored dtype."""
    if name == "keep":
        return None
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_NAMES[name]


def timing_input(*shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random operands for a timing, drawn from a private generator: a measurement taken on some ranks only, or
    again at a resume, must not move the global random stream that training draws from (NEFTune, dropout)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def measured_gemm_flops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 3,
                        rounds: int = 5) -> float:
    """FLOP/s of a square GEMM, best of several rounds: the CPU's practical peak (CPUs have no datasheet table
    here). The best round, not the mean, because other processes only ever make a round slower."""
    a = timing_input(size, size, dtype=dtype, device=device)
    b = timing_input(size, size, dtype=dtype, device=device)
    a @ b
    best = 0.0
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best
