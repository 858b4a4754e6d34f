"""What every sparse policy's cache starts from: a dense KV cache that knows its policy, its grouped-query shape
and softmax scale, and how many positions the prompt has written.

Entry point: PolicyCache (subclassed by TopKCache, IndexedTopKCache and H2OCache).
"""

from __future__ import annotations

import math

import torch

from tetra.infer.attention.policy import AttentionPolicy
from tetra.model import KVCache
from tetra.model.config import ModelConfig


class PolicyCache(KVCache):
    """A dense cache (prefill attends densely through it) plus the policy's settings; `length` counts the positions
    written so far, so end_prefill() knows where the prompt ends."""

    def __init__(self, config: ModelConfig, batch: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, policy: AttentionPolicy) -> None:
        super().__init__(config, batch, max_length, dtype, device)
        self.policy = policy
        self.kv_heads = config.kv_heads
        self.scale = 1.0 / math.sqrt(config.resolved_head_dim)
        self.length = 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.length = max(self.length, start + keys.shape[2])
        return super().update(layer, keys, values, start)
