"""H2O (heavy-hitter oracle): a cache that keeps the recent window plus the keys with the most accumulated
attention, per KV head (scores summed over the query heads that share it), and evicts the rest.

Entry point: H2OCache (a KVCache; prefill is dense and records attention mass, end_prefill() evicts down to the
budget, every decode step adds its attention and evicts one key once over budget).
"""

from __future__ import annotations

import torch

from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.attention.policy_cache import PolicyCache
from tetra.infer.attention.union import grouped, ungrouped
from tetra.model.config import ModelConfig

# Queries per block when the prefill computes attention weights explicitly (their column sums are H2O's scores):
# bounds the [B, H, block, S] weights in memory.
QUERY_BLOCK = 256


class H2OCache(PolicyCache):
    """Capacity after t tokens: `recent` + the budget's share of t. Kept keys carry their position, their
    accumulated attention and whether they are real (padding never counts as a heavy hitter)."""

    def __init__(self, config: ModelConfig, batch: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, policy: AttentionPolicy) -> None:
        super().__init__(config, batch, max_length, dtype, device, policy)
        self.mass = torch.zeros((config.n_layers, batch, config.kv_heads, max_length), dtype=torch.float32,
                                device=device)
        self.kept: list[dict[str, torch.Tensor]] | None = None  # per layer, after the prefill

    # ----- prefill: dense attention with explicit weights
    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, start: int) -> torch.Tensor:
        if self.kept is not None:
            return self._decode(layer, q, keys, values, start)
        cached_keys, cached_values = self.update(layer, keys, values, start)
        cached_keys, cached_values = cached_keys.to(q.device, q.dtype), cached_values.to(q.device, q.dtype)
        batch, heads, length, dim = q.shape
        group = heads // self.kv_heads
        qg = q.reshape(batch, self.kv_heads, group, length, dim)
        outputs = []
        for first in range(0, length, QUERY_BLOCK):
            count = min(QUERY_BLOCK, length - first)
            seen = start + first + count  # causal: no query of this block sees a key past its last one
            block = qg[:, :, :, first : first + count].reshape(batch, self.kv_heads, group * count, dim)
            logits = torch.matmul(block, cached_keys[:, :, :seen].transpose(-1, -2)).float() * self.scale
            logits = logits.view(batch, self.kv_heads, group, count, seen)
            allowed = self._allowed(mask, start, first, count, seen, q.device)
            weights = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), dim=-1)
            self.mass[layer, :, :, :seen] += weights.sum(dim=(2, 3)).to(self.mass.device)
            mixed = torch.matmul(weights.view(batch, self.kv_heads, group * count, seen).to(cached_values.dtype),
                                 cached_values[:, :, :seen])
            outputs.append(mixed.view(batch, self.kv_heads, group, count, dim))
        return torch.cat(outputs, dim=3).reshape(batch, heads, length, dim)

    @staticmethod
    def _allowed(mask: torch.Tensor | None, start: int, offset: int, count: int, total: int,
                 device: torch.device) -> torch.Tensor:
        """[B|1, 1, 1, count, total]: may queries start+offset.. (count of them) see each key (the caller's
        [B|1, 1, T, S] mask, else causal)."""
        if mask is None:
            query = torch.arange(start + offset, start + offset + count, device=device)[:, None]
            return (torch.arange(total, device=device)[None] <= query)[None, None, None]
        return mask[:, :, offset : offset + count, :total][:, :, None]

    def end_prefill(self, key_padding: torch.Tensor | None) -> None:
        """Keep the window and the heaviest prefix keys of every layer; drop the full-length tensors."""
        length = self.length
        batch = self.keys.shape[1]
        device = self.keys.device
        positions = torch.arange(length, device=device)
        real = torch.ones((batch, length), dtype=torch.bool, device=device) if key_padding is None \
            else key_padding[:, :length].to(device).bool()
        self.kept = []
        for layer in range(self.keys.shape[0]):
            entry = {"keys": self.keys[layer, :, :, :length], "values": self.values[layer, :, :, :length],
                     "mass": self.mass[layer, :, :, :length],
                     "position": positions.expand(batch, self.kv_heads, length),
                     "real": real[:, None].expand(batch, self.kv_heads, length)}
            self.kept.append(self._evict(entry, newest=length - 1))
        self.keys = self.values = self.mass = None  # the full-length cache is gone: memory is the budget's

    def _capacity(self, seen: int) -> int:
        return min(seen, self.policy.recent + self.policy.keys_for(seen))

    def _evict(self, entry: dict[str, torch.Tensor], newest: int) -> dict[str, torch.Tensor]:
        """Down to capacity: the window (positions > newest - recent) always stays, then the most mass."""
        count = entry["keys"].shape[2]
        capacity = self._capacity(newest + 1)
        if count <= capacity:
            return {name: tensor.contiguous() for name, tensor in entry.items()}
        priority = entry["mass"].masked_fill(~entry["real"], float("-inf"))
        priority = priority.masked_fill(entry["position"] > newest - self.policy.recent, float("inf"))
        keep = torch.topk(priority, capacity, dim=-1).indices.sort(dim=-1).values  # position order
        picked = {}
        for name, tensor in entry.items():
            index = keep if tensor.dim() == 3 else keep[..., None].expand(*keep.shape, tensor.shape[-1])
            picked[name] = torch.gather(tensor, 2, index)
        return picked

    # ----- decoding over the kept keys
    def _decode(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                start: int) -> torch.Tensor:
        entry = self.kept[layer]
        batch = keys.shape[0]
        device = entry["keys"].device
        entry = {"keys": torch.cat((entry["keys"], keys.to(device, entry["keys"].dtype)), dim=2),
                 "values": torch.cat((entry["values"], values.to(device, entry["values"].dtype)), dim=2),
                 "mass": torch.cat((entry["mass"], torch.zeros((batch, self.kv_heads, 1), device=device)), dim=2),
                 "position": torch.cat((entry["position"],
                                        torch.full((batch, self.kv_heads, 1), start, device=device)), dim=2),
                 "real": torch.cat((entry["real"], torch.ones((batch, self.kv_heads, 1), dtype=torch.bool,
                                                               device=device)), dim=2)}
        qg = grouped(q, self.kv_heads)
        kept_keys = entry["keys"].to(q.device, q.dtype)
        logits = torch.einsum("bkgd,bksd->bkgs", qg, kept_keys).float() * self.scale
        logits = logits.masked_fill(~entry["real"][:, :, None].to(q.device), float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        entry["mass"] = entry["mass"] + weights.sum(dim=2).to(device)
        out = torch.einsum("bkgs,bksd->bkgd", weights.to(q.dtype), entry["values"].to(q.device, q.dtype))
        self.kept[layer] = self._evict(entry, newest=start)
        return ungrouped(out)

    def memory_bytes(self) -> dict[str, int]:
        if self.kept is None:
            return super().memory_bytes()
        held: dict[str, int] = {}
        for entry in self.kept:
            for tensor in entry.values():
                held[tensor.device.type] = held.get(tensor.device.type, 0) + tensor.numel() * tensor.element_size()
        return held

    def kept_positions(self, layer: int) -> torch.Tensor:
        """Positions [B, Hkv, M] the layer still holds (tests, and what the eviction keeps)."""
        return self.kept[layer]["position"]
