"""Communication overlapped with computation in a tensor-parallel training step (the AxoNN schedule):
the input-gradient all-reduce runs while the weight-gradient GEMM computes, the depth reduce-scatter of a weight
gradient runs in the background, the next layer's depth all-gather is prefetched while this layer computes (in
forward, and in backward when gathered blocks are not kept: regather), and data-parallel gradient sums start in
buckets as soon as their gradients are final, during the backward pass. An untied, unsharded token embedding's
gradient is summed over its touched rows only (the union over the ranks, found while backward runs): rows no rank's
tokens used are zero everywhere, and with a large vocabulary they are most of the table.

With overlap off, every collective is started and waited at once, in the same order on the same buffers, so the
results are bit-identical; only the waiting moves. Every wait is explicit (Pending.wait): nothing relies on a
device synchronization.

Entry point: CommSchedule (one per parallelized model), used by TensorParallelLinear and sync_gradients.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from tetra.parallel.collectives import Group, Pending, start_all_gather_flat, start_all_reduce

# Data-parallel gradient buckets: large enough to amortize latency, small enough to start early.
BUCKET_BYTES = 16 * 2**20


class _Bucket:
    """Gradients reduced together over one group: summed as one flat buffer once all of them are final."""

    def __init__(self, parameters: list[nn.Parameter], group: Group) -> None:
        self.parameters, self.group = parameters, group
        self.ready: set[int] = set()
        self.missing: set[int] = set()
        self.pending: Pending | None = None
        self.copied_back = False

    def reset(self) -> None:
        self.ready.clear()
        self.pending, self.copied_back = None, False

    @property
    def complete(self) -> bool:
        return len(self.ready) == len(self.parameters)

    def start(self, blocking: bool) -> None:
        self.missing = {id(p) for p in self.parameters if p.grad is None}  # unused this step: stays None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        self.pending = start_all_reduce(torch.cat([grad.reshape(-1) for grad in grads]), self.group, blocking)

    def finish(self) -> None:
        """Wait for the sum and make it the gradients (once, however often it is called): each gradient becomes its
        view of the summed buffer, so nothing is copied back and the unsummed gradients are freed."""
        if self.copied_back:
            return
        self.copied_back = True
        summed, offset = self.pending.wait(), 0
        for parameter in self.parameters:
            piece = summed[offset:offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
            if id(parameter) not in self.missing:
                parameter.grad = piece


class _RowBucket(_Bucket):
    """An embedding table's gradient summed over the rows some rank's tokens touched this step. The union of the
    ranks' touched rows is summed (a small all-reduce) when the step's last backward begins, so it is known before
    the gradient is; the table's other rows are zero on every rank and stay as they are."""

    def __init__(self, parameter: nn.Parameter, group: Group, source: nn.Module) -> None:
        super().__init__([parameter], group)
        self.source = source  # the embedding: .touched (uses per local row) and .block_shape
        self.union: Pending | None = None
        self.rows: torch.Tensor | None = None

    def start_union(self, blocking: bool) -> None:
        self.union = start_all_reduce(self.source.touched.clone(), self.group, blocking)

    def start(self, blocking: bool) -> None:
        (parameter,) = self.parameters
        self.missing = {id(parameter)} if parameter.grad is None else set()
        self.rows = self.union.wait().nonzero()[:, 0]
        table = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
        packed = table.view(self.source.block_shape).index_select(0, self.rows)
        self.pending = start_all_reduce(packed, self.group, blocking)

    def finish(self) -> None:
        if self.copied_back:
            return
        self.copied_back = True
        (parameter,) = self.parameters
        summed = self.pending.wait()
        if id(parameter) not in self.missing:
            parameter.grad.view(self.source.block_shape).index_copy_(0, self.rows, summed)
        self.source.touched.zero_()


class CommSchedule:
    """The pending collectives of one model on one rank, and whether they overlap computation (overlap=True)."""

    def __init__(self, overlap: bool = True, bucket_bytes: int = BUCKET_BYTES, regather: bool = False) -> None:
        # regather: a depth-sharded layer gathers its weight block again in backward instead of keeping the forward's
        # (FSDP's reshard-after-forward): one more all-gather per layer, no whole block held between the passes.
        self.overlap, self.bucket_bytes, self.regather = overlap, bucket_bytes, regather
        self._next_layer: dict[int, nn.Module] = {}  # depth-sharded layer -> the one forward runs after it
        self._previous_layer: dict[int, nn.Module] = {}  # ... -> the one backward runs after it
        self._prefetched: dict[int, tuple[int, Pending]] = {}  # id(layer) -> (weight version, gather) for forward
        self._prefetched_backward: dict[int, tuple[int, Pending]] = {}  # the same, for backward
        self._deferred: deque[tuple[Pending, Callable[[torch.Tensor], None]]] = deque()
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._armed, self._next_bucket = False, 0
        # Parameters whose gradient arrives through defer() (depth-sharded weights): autograd still runs their
        # gradient-accumulation hooks, with no gradient, so those hooks must not count as the gradient being final.
        self._deferred_parameters: set[int] = set()

    def gradient_arrives_deferred(self, parameter: nn.Parameter) -> None:
        self._deferred_parameters.add(id(parameter))

    def set_forward_order(self, layers: list[nn.Module]) -> None:
        """The depth-sharded layers in the order forward uses them: each prefetches the next one's weights."""
        self._next_layer = {id(layer): following for layer, following in zip(layers, layers[1:], strict=False)}
        self._previous_layer = {id(following): layer for layer, following in zip(layers, layers[1:], strict=False)}

    @property
    def blocking(self) -> bool:
        return not self.overlap

    # Depth all-gathers, one layer ahead: in forward order, and in backward order when blocks are gathered again.
    def gathered_weight(self, layer: nn.Module, shard: torch.Tensor, group: Group,
                        backward: bool = False) -> torch.Tensor:
        """The layer's full flat weight block; with overlap, the gather of the layer that runs next (in this pass's
        order) starts before returning."""
        prefetches = self._prefetched_backward if backward else self._prefetched
        prefetched = prefetches.pop(id(layer), None)
        if prefetched is not None and prefetched[0] == shard._version:
            gathered = prefetched[1].wait()
        else:
            if prefetched is not None:  # the weights changed since (an optimizer step): gather again
                prefetched[1].wait()
            gathered = start_all_gather_flat(shard, group, blocking=True).wait()
        order = self._previous_layer if backward else self._next_layer
        following = order.get(id(layer)) if self.overlap else None
        if following is not None and id(following) not in prefetches:
            prefetches[id(following)] = (following.weight._version, start_all_gather_flat(following.weight, group))
        return gathered

    # Backward: gradient reduce-scatters finish in the background, in the order they started.
    def defer(self, pending: Pending, finish: Callable[[torch.Tensor], None]) -> None:
        self._deferred.append((pending, finish))
        if self.blocking:
            self.poll(everything=True)

    def poll(self, everything: bool = False) -> None:
        """Finish the deferred collectives that are done (all of them with everything=True), oldest first."""
        while self._deferred and (everything or self._deferred[0][0].done()):
            pending, finish = self._deferred.popleft()
            finish(pending.wait())

    # Data-parallel sums, bucketed, started during the last backward of a step.
    def build_buckets(self, model: nn.Module, group_of: Callable[[nn.Parameter], Group]) -> None:
        """Buckets in reverse registration order (roughly the order backward finishes gradients), one group each."""
        self._buckets, self._bucket_of = [], {}
        open_buckets: dict[int, list[nn.Parameter]] = {}
        open_bytes: dict[int, int] = {}
        groups: dict[int, Group] = {}

        def close(key: int) -> None:
            open_bytes.pop(key, None)
            bucket = _Bucket(open_buckets.pop(key), groups[key])
            self._buckets.append(bucket)
            for parameter in bucket.parameters:
                self._bucket_of[id(parameter)] = bucket

        for parameter in reversed([p for p in model.parameters() if p.requires_grad]):
            group = group_of(parameter)
            if group is None:
                continue
            source = getattr(parameter, "tetra_row_source", None)  # an embedding that records its touched rows
            if source is not None:
                for key in list(open_buckets):  # their gradients are final earlier: they must not wait for it
                    close(key)
                bucket = _RowBucket(parameter, group, source)
                self._buckets.append(bucket)
                self._bucket_of[id(parameter)] = bucket
                self._hook(parameter)
                continue
            key = id(group)
            groups[key] = group
            open_buckets.setdefault(key, []).append(parameter)
            open_bytes[key] = open_bytes.get(key, 0) + parameter.numel() * parameter.element_size()
            if open_bytes[key] >= self.bucket_bytes:
                close(key)
            self._hook(parameter)
        for key in list(open_buckets):
            close(key)

    def _hook(self, parameter: nn.Parameter) -> None:
        """Tell the schedule when the parameter's gradient is final (unless it arrives through defer())."""
        if id(parameter) not in self._deferred_parameters and not getattr(parameter, "_tetra_hooked", False):
            parameter.register_post_accumulate_grad_hook(self.gradient_final)
            parameter._tetra_hooked = True

    def arm(self) -> None:
        """The next backward is the step's last: start the buckets' sums as their gradients become final.

        Earlier micro-batches' reduce-scatters are finished first, so only this backward can complete a gradient."""
        self.poll(everything=True)
        self._armed, self._next_bucket = True, 0
        for bucket in self._buckets:
            bucket.reset()
            if isinstance(bucket, _RowBucket):  # every forward of the step has run: the touched rows are known
                bucket.start_union(self.blocking)

    def gradient_final(self, parameter: nn.Parameter) -> None:
        """Called once a parameter's gradient for this step is complete. Buckets start strictly in bucket order,
        so every rank issues the same collectives in the same order whatever the timing."""
        bucket = self._bucket_of.get(id(parameter)) if self._armed else None
        if bucket is None:
            return
        bucket.ready.add(id(parameter))
        while self._next_bucket < len(self._buckets) and self._buckets[self._next_bucket].complete:
            self._start_next_bucket()

    def _start_next_bucket(self) -> None:
        bucket = self._buckets[self._next_bucket]
        bucket.start(self.blocking)
        if self.blocking:
            bucket.finish()
        self._next_bucket += 1

    def flush(self) -> None:
        """After the step's last backward: finish the reduce-scatters and start every bucket not yet started.

        Bucket sums start at moments that depend on timing, so before the next other collective on their groups
        (a loss sum, say) every rank must have started all of them: then all ranks issue the same sequence."""
        self.poll(everything=True)
        while self._armed and self._next_bucket < len(self._buckets):
            self._start_next_bucket()

    def finish(self) -> set[int]:
        """Wait for everything still running; returns the ids of parameters whose data-parallel sum is done."""
        self.flush()
        for prefetches in (self._prefetched, self._prefetched_backward):
            for _, pending in prefetches.values():
                pending.wait()
            prefetches.clear()
        if not self._armed:
            return set()
        for bucket in self._buckets:
            bucket.finish()
        self._armed = False
        return {id(p) for bucket in self._buckets for p in bucket.parameters}
