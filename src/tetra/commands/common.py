"""Pieces several commands share: device and dtype choice, JSON output.

Entry points: resolve_device, resolve_dtype, print_json.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from tetra.errors import ConfigError

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for, but no CUDA device is visible. Use --device cpu.")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """'auto' is bf16 on GPUs and fp32 on CPUs; 'keep' (None) leaves the stored dtype."""
    if name == "keep":
        return None
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_NAMES[name]


def print_json(value: Any) -> None:
    """One JSON object on stdout, for --json."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
