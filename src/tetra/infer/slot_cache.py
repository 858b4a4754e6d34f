"""A KV cache of independent slots: each row holds one sequence at its own length, so sequences can join and leave
a running batch between decode steps (continuous batching).

Entry point: SlotCache (prefill_view(slot) for one new sequence, decode_view(slots, positions) for one batched step).
"""

from __future__ import annotations

import torch

from tetra.model import KVCache
from tetra.model.config import ModelConfig


class SlotCache:
    """Keys/values [layers, slots, kv_heads, time, head_dim]; the time axis grows (doubling) up to max_length."""

    def __init__(self, config: ModelConfig, slots: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, initial_length: int = 256) -> None:
        self.config, self.slots, self.max_length = config, slots, max_length
        self.dtype, self.device = dtype, device
        length = min(initial_length, max_length)
        shape = (config.cache_layers, slots, config.kv_heads, length, config.resolved_head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Abacus models: how many digits each slot's sequence currently ends on, so a number continues across steps.
        self.digit_runs = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, length: int) -> None:
        """Make room for positions 0..length-1 in every slot (copying once when the time axis must grow)."""
        if length > self.max_length:
            raise ValueError(f"slot cache holds {self.max_length} positions; asked for {length}")
        if length <= self.capacity:
            return
        new_length = min(self.max_length, max(length, 2 * self.capacity))
        grown = []
        for old in (self.keys, self.values):
            shape = (*old.shape[:3], new_length, old.shape[4])
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, : old.shape[3]] = old
            grown.append(new)
        self.keys, self.values = grown

    def prefill_view(self, slots: list[int]) -> KVCache:
        """A cache for prompts starting at position 0, row i writing straight into slots[i]. Right-padded rows
        leave junk past their prompt; decode_mask never shows it and the next token overwrites it."""
        return _SlotView(self, slots)

    def decode_view(self, slots: list[int], positions: list[int]) -> KVCache:
        """A cache for one new token per row: row i writes at positions[i] of slots[i] and reads up to the longest."""
        return _DecodeView(self, slots, positions)


def _rows(slots: list[int], device: torch.device) -> slice | torch.Tensor:
    """Index of the slots: a slice (a view, no copy) when they are consecutive."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, device=device)


class _SlotView(KVCache):
    """Writes of a prefill forward pass land in the given slots of the shared tensors. (Its rows are right-padded,
    so the engine sets the slots' digit runs from the real prompts afterwards.)"""

    def __init__(self, owner: SlotCache, slots: list[int]) -> None:  # noqa: D107 - no allocation, unlike KVCache
        self.owner, self.slots = owner, slots
        self.max_length = owner.max_length

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + keys.shape[2]
        self.owner.reserve(end)
        rows = _rows(self.slots, self.owner.keys.device)
        self.owner.keys[layer][rows, :, start:end] = keys
        self.owner.values[layer][rows, :, start:end] = values
        return self.owner.keys[layer][rows, :, :end], self.owner.values[layer][rows, :, :end]


class _DecodeView(KVCache):
    """One token per row at per-row positions; reads every row up to the longest (the mask hides the rest)."""

    def __init__(self, owner: SlotCache, slots: list[int], positions: list[int]) -> None:  # noqa: D107
        self.owner = owner
        self.max_length = owner.max_length
        self.length = max(positions) + 1
        owner.reserve(self.length)
        device = owner.keys.device
        self.rows = _rows(slots, device)
        self.slot_index = torch.tensor(slots, device=device)
        self.position_index = torch.tensor(positions, device=device)

    @property
    def digit_run(self) -> torch.Tensor:
        """Each row's current run of digits (abacus positions continue it)."""
        return self.owner.digit_runs[self.slot_index]

    @digit_run.setter
    def digit_run(self, runs: torch.Tensor) -> None:
        self.owner.digit_runs[self.slot_index] = runs

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        # keys [B, H, 1, D] go to (slot_index[b], position_index[b]); advanced indices around a slice put B first.
        self.owner.keys[layer][self.slot_index, :, self.position_index] = keys[:, :, 0]
        self.owner.values[layer][self.slot_index, :, self.position_index] = values[:, :, 0]
        keys_so_far = self.owner.keys[layer][self.rows, :, : self.length]
        return keys_so_far, self.owner.values[layer][self.rows, :, : self.length]


def decode_mask(positions: list[int], sliding_window: int, device: torch.device | str) -> torch.Tensor:
    """Boolean [B, 1, 1, S]: row i sees its keys 0..positions[i] (within the sliding window when there is one)."""
    query = torch.tensor(positions, device=device)[:, None]
    key = torch.arange(max(positions) + 1, device=device)[None, :]
    allowed = key <= query
    if sliding_window:
        allowed = allowed & (key > query - sliding_window)
    return allowed[:, None, None, :]
