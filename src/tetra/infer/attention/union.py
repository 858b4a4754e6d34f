"""The arithmetic every sparse policy shares: queries grouped by their KV head, rows gathered by index, and one
softmax over selected prefix keys plus the dense recent window.

Entry points: grouped, ungrouped, gather_rows, attend_union, decode_validity.
"""

from __future__ import annotations

import torch


def grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """One decoding query per head [B, H, 1, D] as [B, Hkv, G, D]: head h reads KV head h // G (as SDPA's GQA)."""
    batch, heads, _, dim = q.shape
    return q.reshape(batch, kv_heads, heads // kv_heads, dim)


def ungrouped(out: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, D] back to the layer's [B, H, 1, D]."""
    batch, kv_heads, group, dim = out.shape
    return out.reshape(batch, kv_heads * group, 1, dim)


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [B, Hkv, S, D] picked by index [B, Hkv, G, k] -> [B, Hkv, G, k, D] (each query head its own picks)."""
    batch, kv_heads, group, picked = index.shape
    dim = rows.shape[-1]
    source = rows[:, :, None].expand(batch, kv_heads, group, rows.shape[2], dim)
    return torch.gather(source, 3, index[..., None].expand(batch, kv_heads, group, picked, dim))


def attend_union(selected_logits: torch.Tensor, selected_values: torch.Tensor, window_logits: torch.Tensor,
                 window_values: torch.Tensor) -> torch.Tensor:
    """Attention over the union of picked keys (logits [B, Hkv, G, k], values [B, Hkv, G, k, D]) and the window
    (logits [B, Hkv, G, W], values [B, Hkv, W, D]) with one softmax; fp32 softmax subtracts the max. -> [B, Hkv, G, D]
    """
    logits = torch.cat((selected_logits, window_logits), dim=-1).float()
    weights = torch.softmax(logits, dim=-1).to(window_values.dtype)
    picked = selected_logits.shape[-1]
    out = torch.einsum("bkgs,bkgsd->bkgd", weights[..., :picked], selected_values)
    return out + torch.einsum("bkgs,bksd->bkgd", weights[..., picked:], window_values)


def decode_validity(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The keys a decoding row may see, [B, 1, 1, S] mask -> [B, 1, 1, S] broadcastable over [B, Hkv, G, S]."""
    if mask is None:
        return None
    return mask[..., :length].reshape(mask.shape[0], 1, 1, length)
