"""A preallocated key/value cache: one tensor per layer for keys and values, written in place.

Entry point: KVCache (allocate once for prompt + new tokens; attention layers call update()).
"""

from __future__ import annotations

import torch

from tetra.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer for up to max_length positions; no reallocation while decoding."""

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (config.n_layers, batch_size, config.kv_heads, max_length, config.resolved_head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B, H, T, D] keys/values at positions start..start+T; return everything cached up to there."""
        end = start + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; asked to write up to {end}")
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

