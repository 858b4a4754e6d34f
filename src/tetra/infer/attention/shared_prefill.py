"""One prefill, many policies: run a prompt into a dense cache once (recording H2O's attention mass if asked), then
fork a cache of any policy from it, as if that policy's own prefill had run (every policy prefills densely).

Entry point: SharedPrefill(model, ids, room, chunk, record_mass).fork(policy) -> a cache ready to decode.
"""

from __future__ import annotations

import torch

from tetra.infer.attention.factory import make_cache
from tetra.infer.attention.h2o import H2OCache
from tetra.infer.attention.policy import AttentionPolicy
from tetra.model import KVCache, Transformer


class SharedPrefill:
    """ids [1, T]; room: tokens to leave for decoding; logits: the last prompt position's [vocab]."""

    def __init__(self, model: Transformer, ids: torch.Tensor, room: int, chunk: int = 0,
                 record_mass: bool = False) -> None:
        self.model, self.length, self.room = model, ids.shape[1], room
        config, dtype, device = model.config, model.embed.weight.dtype, model.embed.weight.device
        total = self.length + room
        self.source = H2OCache(config, 1, total, dtype, device, AttentionPolicy("h2o")) if record_mass \
            else KVCache(config, 1, total, dtype, device)
        step = chunk or self.length
        with torch.inference_mode():
            for start in range(0, self.length, step):
                logits = model(ids[:, start : start + step], kv_cache=self.source, cache_start=start, last_only=True)
        self.logits = logits[0, -1]

    def fork(self, policy: AttentionPolicy) -> KVCache:
        """A cache of `policy` holding this prompt, its prefill ended."""
        if policy.kind == "h2o" and not isinstance(self.source, H2OCache):
            raise ValueError("an H2O fork needs SharedPrefill(..., record_mass=True)")
        cache = make_cache(self.model, policy, 1, self.length + self.room)
        end = self.length
        with torch.inference_mode():
            for layer in range(self.model.config.n_layers):
                cache.update(layer, self.source.keys[layer, :, :, :end], self.source.values[layer, :, :, :end], 0)
            if isinstance(cache, H2OCache):
                cache.mass[:, :, :, :end] = self.source.mass[:, :, :, :end]
                cache.length = end
            cache.end_prefill(None)
        return cache
