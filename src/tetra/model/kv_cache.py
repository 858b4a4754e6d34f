"""A preallocated key/value cache, and the attention over it.

Entry points: KVCache (allocate once for prompt + new tokens; attention layers call attend()), dense_attention.
Attention policies that pick which cached keys a query sees (tetra.infer.attention) subclass KVCache and override
attend(), so the model itself never changes with the policy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tetra.model.config import ModelConfig
from tetra.model.cpu_attention import training_attention


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k, v [B, Hkv, S, D] (grouped heads); causal when queries and keys start together
    and no explicit mask is given, otherwise the caller's boolean mask."""
    if q.shape[2] == 1 and q.device.type == "cpu" and dropout_p == 0.0:
        return _one_query_attention(q, k, v, mask)
    causal = mask is None and q.shape[2] > 1 and k.shape[2] == q.shape[2]
    if mask is None and dropout_p == 0.0:
        out = training_attention(q, k, v, causal)
        if out is not None:
            return out
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A decode step as two batched matmuls with the query heads grouped under their KV head: on CPU this reads
    each cached key once, where SDPA's grouped-query path takes about twice as long (benchmarks/long_context.py)."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    logits = torch.matmul(grouped, k.transpose(-1, -2)) * (1.0 / math.sqrt(dim))
    if mask is not None:
        logits = logits.masked_fill(~mask.reshape(mask.shape[0], 1, 1, mask.shape[-1]), float("-inf"))
    weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(batch, heads, 1, dim)


class KVCache:
    """Keys and values of every layer for up to max_length positions; no reallocation while decoding.

    The cache may live on another device or in another dtype than the model (a bf16 cache in CPU memory for a long
    prompt): writes convert on the way in and attention reads convert on the way out.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (config.cache_layers, batch_size, config.kv_heads, max_length, config.resolved_head_dim)
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

    def end_prefill(self, key_padding: torch.Tensor | None) -> None:
        """The prompt is in (key_padding [B, S]: its real tokens, None without padding); later calls decode.
        A dense cache has nothing to do; a sparse policy fixes its prefix, builds its index or evicts here."""

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, start: int) -> torch.Tensor:
        """Cache the new keys/values at `start`, then attend q [B, H, T, D] over everything cached -> [B, H, T, D]."""
        cached_keys, cached_values = self.update(layer, keys, values, start)
        if cached_keys.device != q.device or cached_keys.dtype != q.dtype:
            cached_keys = cached_keys.to(q.device, q.dtype, non_blocking=True)
            cached_values = cached_values.to(q.device, q.dtype, non_blocking=True)
        return dense_attention(q, cached_keys, cached_values, mask)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this cache holds, per device type ('cpu', 'cuda')."""
        return _bytes_by_device(self.keys, self.values)


def _bytes_by_device(*tensors: torch.Tensor | None) -> dict[str, int]:
    held: dict[str, int] = {}
    for tensor in tensors:
        if tensor is not None:
            held[tensor.device.type] = held.get(tensor.device.type, 0) + tensor.numel() * tensor.element_size()
    return held
