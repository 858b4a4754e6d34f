"""Top-k attention over an index: the long prefix's keys live in FAISS indexes in CPU memory (one per layer,
sequence and KV head), its values in CPU memory; a decode step searches the index with each query head, moves only
the picked values to the device, and attends them together with the dense recent window kept on the device.

Entry point: IndexedTopKCache (a KVCache: prefill writes to CPU memory, end_prefill() builds the indexes).
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.attention.policy_cache import PolicyCache
from tetra.infer.attention.union import attend_union, grouped, ungrouped
from tetra.model.config import ModelConfig

HNSW_NEIGHBOURS = 32  # graph degree M of HNSW indexes
IVF_SMALLEST = 256  # IVF needs enough keys to cluster; below this a flat index is exact and as fast


def build_index(keys: np.ndarray, kind: str, wanted: int, probe: float = 0.25) -> faiss.Index:
    """A maximum-inner-product index over keys [n, D] (float32); IVF searches `probe` of its lists."""
    count, dim = keys.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * wanted)
    elif kind == "ivf" and count >= IVF_SMALLEST:
        lists = max(1, min(count // 39, round(4 * math.sqrt(count))))  # faiss's advice: 4-16 sqrt(n), >= 39 per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # no warning for small lists; k-means still sees every key
        index.train(keys)
        index.nprobe = max(1, math.ceil(lists * probe))
    else:  # flat, or an IVF too small to cluster: exact search
        index = faiss.IndexFlatIP(dim)
    index.add(keys)
    return index


class IndexedTopKCache(PolicyCache):
    """Prefill: keys and values in CPU memory, attention dense on the compute device. Decode: per layer, the
    prefix is searched (k = the budget) and the window [prefix_end, now] is dense on the compute device."""

    def __init__(self, config: ModelConfig, batch: int, max_length: int, dtype: torch.dtype,
                 compute_device: torch.device | str, policy: AttentionPolicy) -> None:
        super().__init__(config, batch, max_length, dtype, "cpu", policy)
        self.compute_device = torch.device(compute_device)
        self.prefix_end: int | None = None
        self.indexes: list[list[list[faiss.Index]]] = []  # [layer][row][kv head]
        self.positions: list[list[np.ndarray]] = []  # [row] -> prefix position of each indexed key
        self.window_keys: torch.Tensor | None = None  # [L, B, Hkv, max_length - prefix_end, D] on the device
        self.window_values: torch.Tensor | None = None

    def end_prefill(self, key_padding: torch.Tensor | None) -> None:
        end = self.prefix_end = max(0, self.length - self.policy.recent)
        layers, batch = self.keys.shape[0], self.keys.shape[1]
        real = torch.ones((batch, end), dtype=torch.bool) if key_padding is None \
            else key_padding[:, :end].cpu().bool()
        self.positions = [np.flatnonzero(real[row].numpy()) for row in range(batch)]
        wanted = self.policy.keys_for(end)

        def index_of(layer: int, row: int, head: int) -> faiss.Index | None:
            keys = self.keys[layer, row, head, self.positions[row]].float().numpy()
            return build_index(keys, self.policy.index, wanted, self.policy.probe) if len(keys) else None

        self.indexes = [[[index_of(layer, row, head) for head in range(self.kv_heads)] for row in range(batch)]
                        for layer in range(layers)]
        self.window_keys = self.keys[:, :, :, end:].to(self.compute_device)
        self.window_values = self.values[:, :, :, end:].to(self.compute_device)
        self.keys = None  # the prefix keys now live in the indexes only
        self.values = self.values[:, :, :, :end].clone()  # and the window's values on the device
        self.window_padding = None if key_padding is None else \
            key_padding[:, end:].to(self.compute_device).bool()

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, start: int) -> torch.Tensor:
        if self.prefix_end is None or q.shape[2] > 1:
            return super().attend(layer, q, keys, values, mask, start)
        end = self.prefix_end
        offset = start - end
        self.window_keys[layer, :, :, offset] = keys[:, :, 0]
        self.window_values[layer, :, :, offset] = values[:, :, 0]
        window_keys = self.window_keys[layer, :, :, : offset + 1].to(q.dtype)
        window_values = self.window_values[layer, :, :, : offset + 1].to(q.dtype)
        qg = grouped(q, self.kv_heads)
        window_logits = torch.einsum("bkgd,bksd->bkgs", qg, window_keys) * self.scale
        if self.window_padding is not None:
            seen = self.window_padding[:, : offset + 1]
            padded = torch.ones((seen.shape[0], offset + 1), dtype=torch.bool, device=seen.device)
            padded[:, : seen.shape[1]] = seen
            window_logits = window_logits.masked_fill(~padded[:, None, None], float("-inf"))
        selected_logits, selected_values = self._search(layer, qg)
        out = attend_union(selected_logits, selected_values.to(q.dtype), window_logits, window_values)
        return ungrouped(out)

    def _search(self, layer: int, qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row and KV head: the index's best k keys for each query head -> logits [B, Hkv, G, k] and their
        values [B, Hkv, G, k, D] (moved from CPU memory to the device)."""
        batch, kv_heads, group, dim = qg.shape
        wanted = self.policy.keys_for(self.prefix_end)
        queries = qg.float().cpu().numpy()
        logits = np.full((batch, kv_heads, group, wanted), -np.inf, dtype=np.float32)
        positions = np.zeros((batch, kv_heads, group, wanted), dtype=np.int64)
        for row in range(batch):
            for head in range(kv_heads):
                index = self.indexes[layer][row][head]
                if index is None:
                    continue
                scores, ids = index.search(np.ascontiguousarray(queries[row, head]), wanted)
                found = ids >= 0
                logits[row, head][found] = scores[found] * self.scale
                positions[row, head][found] = self.positions[row][ids[found]]
        position_index = torch.from_numpy(positions)
        values = self.values[layer]  # [B, Hkv, S, D] in CPU memory
        rows = torch.arange(batch)[:, None, None, None]
        heads = torch.arange(kv_heads)[None, :, None, None]
        picked = values[rows, heads, position_index]  # only these rows leave CPU memory
        device = qg.device
        return torch.from_numpy(logits).to(device), picked.to(device, non_blocking=True)

    def memory_bytes(self) -> dict[str, int]:
        if self.prefix_end is None:
            return super().memory_bytes()
        held = {"cpu": self.host_bytes()}
        held[self.compute_device.type] = held.get(self.compute_device.type, 0) + self.device_bytes()
        return held

    def host_bytes(self) -> int:
        """CPU memory of the prefix: the indexes' vectors (float32; HNSW's graph links come on top) and the values."""
        vectors = sum(index.ntotal for layer in self.indexes for row in layer for index in row if index is not None)
        dim = self.values.shape[-1]
        return vectors * dim * 4 + self.values.numel() * self.values.element_size()

    def device_bytes(self) -> int:
        """Compute-device memory: the dense window only."""
        return sum(t.numel() * t.element_size() for t in (self.window_keys, self.window_values) if t is not None)
