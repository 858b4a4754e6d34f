"""Choosing the autocast dtype: bf16 on GPUs; on CPUs only where bf16 matrix multiplication is measurably faster.

Entry point: choose_autocast_dtype(precision, device) -> (dtype or None, reason).
"""

from __future__ import annotations

import torch

from tetra.devices import measured_gemm_flops

# bf16 autocast costs casts and rounding; on a CPU it pays off only when its GEMMs are clearly faster.
CPU_BF16_MIN_SPEEDUP = 1.5


def choose_autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """None means plain fp32. Master weights and optimizer state stay fp32 either way."""
    if precision == "fp32":
        return None, "fp32 (asked for)"
    if precision == "bf16":
        return torch.bfloat16, "bf16 autocast (asked for)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (GPU)"
        return None, "fp32 (this GPU has no bf16)"
    speedup = measured_gemm_flops(torch.bfloat16, device, 1024) / measured_gemm_flops(torch.float32, device, 1024)
    if speedup >= CPU_BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"bf16 autocast (bf16 GEMM measured {speedup:.1f}x faster than fp32 on this CPU)"
    return None, f"fp32 (bf16 GEMM only {speedup:.1f}x faster on this CPU)"
