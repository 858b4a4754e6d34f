"""Fitting Loki's PCA basis: run calibration text through the model and accumulate, per layer and KV head, the
second moment of the post-rotary keys the cache would hold.

Entry point: calibrate_loki(model, sequences) -> LokiBasis.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tetra.infer.attention.loki import LokiBasis
from tetra.model import KVCache, Transformer


class _KeyMoments(KVCache):
    """A dense cache that also sums k k^T [Hkv, D, D] of every key written to it."""

    def __init__(self, model: Transformer, length: int, moments: list[torch.Tensor]) -> None:
        super().__init__(model.config, 1, length, model.embed.weight.dtype, model.embed.weight.device)
        self.moments = moments

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = keys.double()
        self.moments[layer] += torch.einsum("bhtd,bhte->hde", flat, flat).cpu()
        return super().update(layer, keys, values, start)


@torch.inference_mode()
def calibrate_loki(model: Transformer, sequences: Iterable[list[int]]) -> LokiBasis:
    """The basis fitted on the keys of every token of `sequences` (each run alone, from position 0)."""
    config = model.config
    dim = config.resolved_head_dim
    moments = [torch.zeros((config.kv_heads, dim, dim), dtype=torch.float64) for _ in range(config.n_layers)]
    tokens = 0
    device = model.embed.weight.device
    for sequence in sequences:
        cache = _KeyMoments(model, len(sequence), moments)
        model(torch.tensor([sequence], device=device), kv_cache=cache, last_only=True)
        tokens += len(sequence)
    if tokens == 0:
        raise ValueError("Loki calibration needs at least one token of text")
    return LokiBasis.from_moments(moments, tokens)
