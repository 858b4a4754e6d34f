"""The arithmetic every sparse policy shares: queries grouped by their KV head, rows gathered by index, and one
softmax over selected prefix keys plus the dense recent window.

Entry points: grouped, ungrouped, gather_rows, select_top, attend_union, decode_validity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# select_top's shortcut pays off for long rows and small shares: it thresholds on a strided sample first.
SAMPLED_SELECTION_FROM = 16384
SAMPLE_STRIDE = 16


class Top(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def select_top(scores: torch.Tensor, count: int) -> Top:
    """The `count` largest scores along the last axis (order unspecified), exactly as torch.topk finds them.

    For long rows the k-th largest value is first bracketed from below with a strided sample (a threshold t with at
    least `count` scores >= t in every row means every top score is >= t), and the full selection then runs over
    those candidates only; when the sample's threshold is too high the full torch.topk runs instead."""
    length = scores.shape[-1]
    if length < SAMPLED_SELECTION_FROM or count * 8 > length:
        return Top(*torch.topk(scores, count, dim=-1, sorted=False))
    rows = scores.reshape(-1, length)
    sample = rows[:, ::SAMPLE_STRIDE]
    wanted = min(sample.shape[1], math.ceil(1.25 * count / SAMPLE_STRIDE) + 8)
    threshold = torch.topk(sample, wanted, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    candidates = rows >= threshold
    if bool((candidates.sum(dim=-1) < count).any()):
        return Top(*torch.topk(scores, count, dim=-1, sorted=False))
    values, indices = [], []
    for row, keep in zip(rows, candidates, strict=True):
        positions = keep.nonzero().squeeze(1)
        best = torch.topk(row[positions], count, sorted=False)
        values.append(best.values)
        indices.append(positions[best.indices])
    shape = (*scores.shape[:-1], count)
    return Top(torch.stack(values).reshape(shape), torch.stack(indices).reshape(shape))


def grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """One decoding query per head [B, H, 1, D] as [B, Hkv, G, D]: head h reads KV head h // G (as SDPA's GQA)."""
    batch, heads, _, dim = q.shape
    return q.reshape(batch, kv_heads, heads // kv_heads, dim)


def ungrouped(out: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, D] back to the layer's [B, H, 1, D]."""
    batch, kv_heads, group, dim = out.shape
    return out.reshape(batch, kv_heads * group, 1, dim)


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [B, Hkv, S, D] picked by index [B, Hkv, G, k] -> [B, Hkv, G, k, D] (each query head its own picks).

    One index_select over the rows as a flat [N, D] view of their storage (a gather over an expanded view is ~10x
    slower on CPU); a slice of a longer cache keeps its storage, so nothing is copied first."""
    batch, kv_heads, group, picked = index.shape
    dim = rows.shape[3]
    strides = rows.stride()
    if strides[3] != 1 or strides[2] != dim or strides[1] % dim or strides[0] % dim:
        rows = rows.contiguous()
        strides = rows.stride()
    span = (rows.shape[0] - 1) * strides[0] + (rows.shape[1] - 1) * strides[1] + rows.shape[2] * dim
    flat = torch.as_strided(rows, (span // dim, dim), (dim, 1))
    base = (torch.arange(batch, device=index.device).reshape(batch, 1, 1, 1) * (strides[0] // dim)
            + torch.arange(kv_heads, device=index.device).reshape(1, kv_heads, 1, 1) * (strides[1] // dim))
    return flat.index_select(0, (index + base).reshape(-1)).reshape(batch, kv_heads, group, picked, dim)


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
