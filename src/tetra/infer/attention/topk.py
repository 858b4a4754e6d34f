"""Exact top-k attention: every cached prefix key is scored, the k best plus the recent window are attended.

Entry point: TopKCache (a KVCache; prefill is dense, end_prefill() freezes the prefix, decoding is sparse).
"""

from __future__ import annotations

import torch

from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.attention.policy_cache import PolicyCache
from tetra.infer.attention.union import attend_union, decode_validity, gather_rows, grouped, select_top, ungrouped
from tetra.model.config import ModelConfig


class TopKCache(PolicyCache):
    """A dense cache whose decode steps attend to the policy's k best prefix keys and every key after the prefix.

    The prefix is the prompt minus its `recent` newest tokens, fixed when the prompt is in; keys generated later
    join the dense window. Subclasses change how the prefix is scored (Loki: in a low-rank PCA basis).
    """

    def __init__(self, config: ModelConfig, batch: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, policy: AttentionPolicy) -> None:
        super().__init__(config, batch, max_length, dtype, device, policy)
        self.prefix_end: int | None = None  # None while the prompt is still being prefilled

    def end_prefill(self, key_padding: torch.Tensor | None) -> None:
        self.prefix_end = max(0, self.length - self.policy.recent)

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, start: int) -> torch.Tensor:
        if self.prefix_end is None or q.shape[2] > 1:
            return super().attend(layer, q, keys, values, mask, start)
        cached_keys, cached_values = self.update(layer, keys, values, start)
        cached_keys = cached_keys.to(q.device, q.dtype)
        cached_values = cached_values.to(q.device, q.dtype)
        end = self.prefix_end
        qg = grouped(q, self.kv_heads)
        prefix_keys = cached_keys[:, :, :end]
        scores = self.scores(layer, qg, prefix_keys)
        valid = decode_validity(mask, cached_keys.shape[2])
        if valid is not None:
            scores = scores.masked_fill(~valid[..., :end], float("-inf"))
        picked = select_top(scores, self.policy.keys_for(end))
        selected_logits = self.selected_logits(qg, prefix_keys, picked)
        selected_values = gather_rows(cached_values[:, :, :end], picked.indices)
        window_logits = torch.matmul(qg, cached_keys[:, :, end:].transpose(-1, -2)) * self.scale
        if valid is not None:
            window_logits = window_logits.masked_fill(~valid[..., end:], float("-inf"))
        out = attend_union(selected_logits, selected_values, window_logits, cached_values[:, :, end:])
        return ungrouped(out)

    def scores(self, layer: int, qg: torch.Tensor, prefix_keys: torch.Tensor) -> torch.Tensor:
        """Scores [B, Hkv, G, P] that rank the prefix keys for each query head (here: the exact logits)."""
        return torch.matmul(qg, prefix_keys.transpose(-1, -2)) * self.scale

    def selected_logits(self, qg: torch.Tensor, prefix_keys: torch.Tensor, picked) -> torch.Tensor:
        """The exact logits of the picked keys (the scores already are, for exact top-k)."""
        return picked.values
