"""One collective per process group for many tensors: what an optimizer that sums or gathers a small piece of every
weight matrix needs, since a collective's fixed cost (and, on shared cores, every rank's wait for the slowest) is
paid once per group instead of once per matrix.

Each function takes one group per tensor (None or a group of one: nothing to do) and runs the groups in the order
they first appear, which every rank agrees on when each walks the same matrices in the same order.

Entry points: all_reduce_each(tensors, groups), all_gather_each(pieces, groups), reduce_scatter_each(flats, groups).
"""

from __future__ import annotations

import torch

from tetra.parallel.collectives import Group, _size, all_gather_flat, all_reduce, reduce_scatter_flat


def _by_group(groups: list[Group]) -> list[tuple[Group, list[int]]]:
    """Indices of the tensors of each group that has more than one rank, groups in first-appearance order."""
    found: dict[int, tuple[Group, list[int]]] = {}
    for index, group in enumerate(groups):
        if _size(group) > 1:
            found.setdefault(id(group), (group, []))[1].append(index)
    return list(found.values())


def all_reduce_each(tensors: list[torch.Tensor], groups: list[Group]) -> None:
    """Sum every tensor over its group, in place."""
    for group, indices in _by_group(groups):
        flat = all_reduce(torch.cat([tensors[i].reshape(-1) for i in indices]), group)
        offset = 0
        for i in indices:
            tensors[i].copy_(flat[offset:offset + tensors[i].numel()].view_as(tensors[i]))
            offset += tensors[i].numel()


def all_gather_each(pieces: list[torch.Tensor], groups: list[Group]) -> list[torch.Tensor]:
    """For each 1-D piece, every rank's piece concatenated in group-rank order (what all_gather_flat returns)."""
    gathered = list(pieces)
    for group, indices in _by_group(groups):
        sizes = [pieces[i].numel() for i in indices]
        rows = all_gather_flat(torch.cat([pieces[i] for i in indices]), group).view(_size(group), sum(sizes))
        for i, part in zip(indices, rows.split(sizes, dim=1), strict=True):
            gathered[i] = part.reshape(-1)
    return gathered


def reduce_scatter_each(flats: list[torch.Tensor], groups: list[Group]) -> list[torch.Tensor]:
    """For each 1-D tensor (its length a multiple of the group's size), its sum over the group cut in equal slices
    in group-rank order: this rank's slice (what reduce_scatter_flat returns)."""
    mine = list(flats)
    for group, indices in _by_group(groups):
        size = _size(group)
        sizes = [flats[i].numel() // size for i in indices]
        by_rank = torch.cat([flats[i].view(size, -1) for i in indices], dim=1)
        summed = reduce_scatter_flat(by_rank.reshape(-1), group)
        for i, part in zip(indices, summed.split(sizes), strict=True):
            mine[i] = part
    return mine
