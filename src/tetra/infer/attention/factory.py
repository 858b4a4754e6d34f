"""The KV cache that implements an attention policy.

Entry point: make_cache(model, policy, batch, max_length, ...).
"""

from __future__ import annotations

import torch

from tetra.errors import ConfigError
from tetra.infer.attention.h2o import H2OCache
from tetra.infer.attention.indexed import IndexedTopKCache
from tetra.infer.attention.loki import LokiBasis, LokiCache
from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.attention.topk import TopKCache
from tetra.model import KVCache, Transformer


def make_cache(model: Transformer, policy: AttentionPolicy, batch: int, max_length: int,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
    """The KV cache that decodes with `policy` (dtype/device: where the cache lives; default the model's; the
    index-backed policy always keeps its prefix in CPU memory)."""
    config = model.config
    compute_device = model.embed.weight.device
    dtype = dtype or model.embed.weight.dtype
    device = device or compute_device
    if policy.dense:
        return KVCache(config, batch, max_length, dtype, device)
    if config.iterated:
        raise ConfigError(f"--attention {policy.kind} keeps one set of keys per block, and a recurrent-depth or "
                          "looped model's blocks run many times per token; use --attention dense.")
    if config.sliding_window:
        raise ConfigError(f"--attention {policy.kind} needs full attention, but this model attends within a sliding "
                          f"window of {config.sliding_window} tokens; use --attention dense.")
    if policy.kind == "topk":
        return TopKCache(config, batch, max_length, dtype, device, policy)
    if policy.kind == "loki":
        basis = LokiBasis.for_model(config, policy.loki_path)
        return LokiCache(config, batch, max_length, dtype, device, policy, basis)
    if policy.kind == "h2o":
        return H2OCache(config, batch, max_length, dtype, device, policy)
    return IndexedTopKCache(config, batch, max_length, dtype, compute_device, policy)
