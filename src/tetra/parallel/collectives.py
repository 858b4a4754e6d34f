"""Collectives as autograd functions, one per communication pattern, plus depth gather/scatter of weight shards.

Entry points: reduce_forward (g), reduce_backward (f), reduce_both_ways, all_gather_flat, reduce_scatter_flat.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def _size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; a no-op for a group of one."""
    if _size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_flat(shard: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's equal-sized 1-D shard, in group-rank order."""
    size = _size(group)
    if size == 1:
        return shard
    pieces = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces)


def reduce_scatter_flat(flat: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum a 1-D tensor over the group and keep this rank's equal slice (gloo has no reduce-scatter: all-reduce)."""
    size = _size(group)
    if size == 1:
        return flat
    if dist.get_backend(group) == "nccl":
        out = torch.empty(flat.numel() // size, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(out, flat.contiguous(), group=group)
        return out
    summed = flat.clone()
    dist.all_reduce(summed, group=group)
    return summed.chunk(size)[dist.get_rank(group)].clone()


class _ReduceForward(torch.autograd.Function):
    """Sum partial results in forward; identity in backward (the consumers are replicated, so is the gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceBackward(torch.autograd.Function):
    """Identity in forward; sum the gradient in backward (each rank used the input for a different part)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad.clone(), ctx.group), None


class _ReduceBothWays(torch.autograd.Function):
    """Sum in forward and in backward: for a statistic (a norm's sum of squares) that each rank uses differently."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return all_reduce(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad.clone(), ctx.group), None


def reduce_forward(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    return tensor if _size(group) == 1 else _ReduceForward.apply(tensor, group)


def reduce_backward(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    return tensor if _size(group) == 1 else _ReduceBackward.apply(tensor, group)


def reduce_both_ways(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    return tensor if _size(group) == 1 else _ReduceBothWays.apply(tensor, group)
