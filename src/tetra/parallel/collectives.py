"""Collectives as autograd functions, one per communication pattern, plus depth gather/scatter of weight shards.

Entry points: reduce_forward (g), reduce_backward (f), reduce_both_ways, all_gather_flat, reduce_scatter_flat, and
start_all_reduce / start_all_gather_flat / start_reduce_scatter_flat, which return a Pending to wait on.
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
    return start_all_gather_flat(shard, group, blocking=True).wait()


def reduce_scatter_flat(flat: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum a 1-D tensor over the group and keep this rank's equal slice (gloo has no reduce-scatter: all-reduce)."""
    return start_reduce_scatter_flat(flat, group, blocking=True).wait()


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


class Pending:
    """A collective that may still be running: wait() blocks until it is done and returns its result.

    Started with blocking=True it has already finished; that is the same arithmetic, without overlap."""

    def __init__(self, work: dist.Work | None, finish) -> None:
        self._work, self._finish, self._result = work, finish, None

    def done(self) -> bool:
        return self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self._finish()
        return self._result


def _start(blocking: bool, run, finish) -> Pending:
    work = run(not blocking)
    pending = Pending(work, finish)
    if blocking:
        pending.wait()
    return pending


def start_all_reduce(tensor: torch.Tensor, group: Group, blocking: bool = False) -> Pending:
    """Sum `tensor` in place over the group."""
    if _size(group) == 1:
        return Pending(None, lambda: tensor)
    return _start(blocking, lambda async_op: dist.all_reduce(tensor, group=group, async_op=async_op), lambda: tensor)


def start_all_gather_flat(shard: torch.Tensor, group: Group, blocking: bool = False) -> Pending:
    """all_gather_flat, possibly still running."""
    if _size(group) == 1:
        return Pending(None, lambda: shard)
    # Every rank's piece lands straight in its place in one buffer: no second, concatenated copy of the block.
    gathered = shard.new_empty(shard.numel() * _size(group))
    pieces = list(gathered.chunk(_size(group)))
    source = shard.detach().contiguous()
    return _start(blocking, lambda async_op: dist.all_gather(pieces, source, group=group, async_op=async_op),
                  lambda: gathered)


def start_reduce_scatter_flat(flat: torch.Tensor, group: Group, blocking: bool = False,
                              overwrite: bool = False) -> Pending:
    """reduce_scatter_flat, possibly still running (gloo: an all-reduce, then this rank's slice). overwrite: the
    caller's buffer may serve as the all-reduce's own (one copy of a whole block less)."""
    size = _size(group)
    if size == 1:
        return Pending(None, lambda: flat)
    if dist.get_backend(group) == "nccl":
        out = torch.empty(flat.numel() // size, dtype=flat.dtype, device=flat.device)
        source = flat.contiguous()
        return _start(blocking, lambda async_op: dist.reduce_scatter_tensor(out, source, group=group,
                                                                             async_op=async_op), lambda: out)
    summed = flat if overwrite else flat.clone()
    rank = dist.get_rank(group)
    return _start(blocking, lambda async_op: dist.all_reduce(summed, group=group, async_op=async_op),
                  lambda: summed.chunk(size)[rank].clone())
