"""Tensor-parallel layers: Linear split over row and column and sharded over depth, vocabulary-parallel embedding,
norms over a column-split hidden state, and a vocabulary-parallel cross-entropy.

Entry points: TensorParallelLinear, VocabParallelEmbedding, ColumnSplitEmbedding, ParallelNorm, TiedHead,
vocab_parallel_cross_entropy. Activations between blocks are split over the column group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tetra.parallel.collectives import (
    all_gather_flat,
    all_reduce,
    reduce_backward,
    reduce_both_ways,
    reduce_forward,
    reduce_scatter_flat,
    start_all_reduce,
    start_reduce_scatter_flat,
)
from tetra.parallel.gemm_layout import OUT_IN, forward_gemm, input_grad_gemm, weight_grad_gemm
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout, shard
from tetra.parallel.overlap import CommSchedule


def sharded_parameter(full: torch.Tensor, layout: Layout, grid: ProcessGrid) -> nn.Parameter:
    """A Parameter holding this rank's piece, tagged with its layout (used for gathering and global norms); a frozen
    source (a LoRA base) stays frozen."""
    parameter = nn.Parameter(shard(full.detach(), layout, grid), requires_grad=full.requires_grad)
    parameter.tetra_layout = layout
    return parameter


class _DepthGather(torch.autograd.Function):
    """All-gather a weight shard over depth in forward; reduce-scatter its gradient in backward (ZeRO-3 in TP)."""

    @staticmethod
    def forward(ctx, shard_: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return all_gather_flat(shard_, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter_flat(grad.contiguous(), ctx.group), None


def linear_weight_layout(weight_shape: tuple[int, ...], transposed: bool, gemm_layout: str = OUT_IN) -> Layout:
    """Where a split Linear's W [out, in] lives: out-features over rows and in-features over columns ('transposed'
    layers the other way round), the block sharded over depth and stored in its GEMM layout."""
    return Layout(tuple(weight_shape), row_dim=1 if transposed else 0, col_dim=0 if transposed else 1, depth=True,
                  transposed=gemm_layout != OUT_IN)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


class _OverlappedLinear(torch.autograd.Function):
    """y = x W^T (with the weight stored in the layer's GEMM layout), summed over the in-feature group in forward,
    whose backward overlaps communication with computation (and skips the input gradient when none is needed): the
    input gradient's all-reduce over the out-feature group runs while the weight gradient's GEMM computes; a
    depth-sharded weight's gradient is then reduce-scattered in the background and added to the
    shard's .grad by the layer's CommSchedule."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, shard: torch.Tensor, layer: TensorParallelLinear):
        dtype = _compute_dtype(x, weight)
        x_c, weight_c = x.to(dtype), weight.to(dtype)
        # A depth-gathered block is either kept for backward or, with regather, dropped now and gathered again.
        ctx.regather = layer.depth_group is not None and layer.schedule.regather
        # A frozen weight (a LoRA base) needs no gradient, so its input need not be kept.
        ctx.trains_weight = shard.requires_grad
        ctx.save_for_backward(x_c if ctx.trains_weight else None, None if ctx.regather else weight_c)
        ctx.layer, ctx.input_dtype, ctx.weight_dtype, ctx.compute_dtype = layer, x.dtype, weight.dtype, dtype
        with torch.autocast(x.device.type, enabled=False):
            partial = forward_gemm(x_c, weight_c, layer.gemm_layout)
        # Summed over the in-feature group in place: the GEMM's fresh output is seen by nothing else (no copy).
        # The sum's backward is the identity (every rank of the group uses the whole result), so it lives here.
        return all_reduce(partial, layer.in_group)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        layer: TensorParallelLinear = ctx.layer
        schedule = layer.schedule
        if ctx.regather:
            weight = layer.gathered_block(backward=True).to(ctx.compute_dtype)
        schedule.poll()
        grad_y = grad_y.to(weight.dtype)
        summing = None
        if ctx.needs_input_grad[0]:  # not for a first layer fed data that needs no gradient
            grad_x = input_grad_gemm(grad_y, weight, layer.gemm_layout)  # partial: this rank's out-features only
            summing = start_all_reduce(grad_x, layer.out_group, schedule.blocking)
        if not ctx.trains_weight:
            return None if summing is None else summing.wait().to(ctx.input_dtype), None, None, None
        grad_weight = weight_grad_gemm(grad_y, x, layer.gemm_layout).to(ctx.weight_dtype)
        grad_x = None if summing is None else summing.wait().to(ctx.input_dtype)
        if layer.depth_group is None:
            return grad_x, grad_weight, None, None
        layer.reduce_scatter_weight_grad(grad_weight)
        return grad_x, None, None, None


class TensorParallelLinear(nn.Module):
    """Y = X W^T + b with W[out, in] split: in-features over the column group and out-features over the row group
    (transposed: the other way round), the [out, in] block then sharded over depth.

    Input: the in-feature chunk of this rank. Output: the out-feature chunk, identical across the in-feature group.
    gemm_layout: the block is stored [out, in] (OUT_IN, torch's way) or [in, out] (IN_OUT); see gemm_layout.py.
    """

    def __init__(self, linear: nn.Linear, grid: ProcessGrid, transposed: bool,
                 schedule: CommSchedule | None = None, gemm_layout: str = OUT_IN) -> None:
        super().__init__()
        self.grid, self.gemm_layout = grid, gemm_layout
        self.schedule = schedule or CommSchedule()
        self.depth_group = grid.groups["depth"]
        self.in_group = grid.groups["row" if transposed else "col"]
        self.out_group = grid.groups["col" if transposed else "row"]
        # W is [out, in]: normally out over rows and in over columns; transposed layers swap the two roles.
        weight_layout = linear_weight_layout(linear.weight.shape, transposed, gemm_layout)
        self.stored_shape = weight_layout.stored_block_shape(grid)
        self.weight = sharded_parameter(linear.weight, weight_layout, grid)
        if self.depth_group is not None:
            self.schedule.gradient_arrives_deferred(self.weight)
        self.bias = None
        if linear.bias is not None:
            bias_layout = Layout(tuple(linear.bias.shape), col_dim=0) if transposed else \
                Layout(tuple(linear.bias.shape), row_dim=0)
            self.bias = sharded_parameter(linear.bias, bias_layout, grid)

    def gathered_block(self, backward: bool = False) -> torch.Tensor:
        """This rank's whole [out, in] block (in its stored layout); gathered over depth when sharded."""
        if self.depth_group is None:
            return self.weight.view(self.stored_shape)
        numel = self.stored_shape[0] * self.stored_shape[1]
        flat = self.schedule.gathered_weight(self, self.weight, self.depth_group, backward=backward)
        return flat[:numel].view(self.stored_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _OverlappedLinear.apply(x, self.gathered_block(), self.weight, self)
        return y if self.bias is None else y + self.bias

    def reduce_scatter_weight_grad(self, grad_weight: torch.Tensor) -> None:
        """Sum the block's gradient over depth, keep this rank's shard (zero padding as in the forward gather),
        and add it to the shard's gradient once the collective is done."""
        size = self.weight.numel() * self.grid.size("depth")
        if grad_weight.numel() == size:  # no padding: the GEMM's fresh output is summed in place
            padded = grad_weight.reshape(-1)
        else:
            padded = grad_weight.new_zeros(size)
            padded[:grad_weight.numel()] = grad_weight.reshape(-1)

        def add_to_grad(shard_grad: torch.Tensor) -> None:
            if self.weight.grad is None:
                self.weight.grad = shard_grad
            else:
                self.weight.grad += shard_grad
            self.schedule.gradient_final(self.weight)

        self.schedule.defer(start_reduce_scatter_flat(padded, self.depth_group, self.schedule.blocking,
                                                      overwrite=True), add_to_grad)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with rows (vocabulary) over the row group and columns (hidden) over the column group; the
    [row, col] block is sharded over depth like a Linear's (gathered when used, gradient reduce-scattered)."""

    def __init__(self, embedding: nn.Embedding, grid: ProcessGrid) -> None:
        super().__init__()
        self.grid = grid
        vocab = embedding.weight.shape[0]
        self.per_rank = vocab // grid.size("row")
        self.start = grid.index("row") * self.per_rank
        layout = Layout(tuple(embedding.weight.shape), 0, 1, depth=True)
        self.block_shape = layout.block_shape(grid)
        self.weight = sharded_parameter(embedding.weight, layout, grid)
        self.touched: torch.Tensor | None = None  # uses of each row by this rank's tokens since the last sum

    def sum_touched_rows_only(self) -> None:
        """Count the rows each forward with autograd on uses, so the data-parallel gradient sum sends only the
        union's rows (CommSchedule's row bucket, which resets the counts). Only for an unsharded table whose
        gradient comes from the lookup alone (not tied to the head). Counted with index_add_: no host sync."""
        self.touched = torch.zeros(self.per_rank, dtype=torch.int32)  # moves to the ids' device on first use
        self.weight.tetra_row_source = self

    def block(self) -> torch.Tensor:
        """This rank's [vocab / row, hidden / col] table (for the embedding and a tied head)."""
        depth_group = self.grid.groups["depth"]
        flat = self.weight if depth_group is None else _DepthGather.apply(self.weight, depth_group)
        numel = self.block_shape[0] * self.block_shape[1]
        # Slice only depth padding away: a slice's backward writes its gradient into a fresh zeroed table.
        return (flat if flat.numel() == numel else flat[:numel]).view(self.block_shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        if self.touched is not None and torch.is_grad_enabled():
            if self.touched.device != ids.device:
                self.touched = self.touched.to(ids.device)
            self.touched.index_add_(0, local.clamp(0, self.per_rank - 1).flatten(), inside.flatten().to(torch.int32))
        rows = F.embedding(local.clamp(0, self.per_rank - 1), self.block()) * inside.unsqueeze(-1)
        return reduce_forward(rows, self.grid.groups["row"])


class ColumnSplitEmbedding(nn.Module):
    """Learned position embedding: hidden split over the column group, every position on every rank."""

    def __init__(self, embedding: nn.Embedding, grid: ProcessGrid) -> None:
        super().__init__()
        self.weight = sharded_parameter(embedding.weight, Layout(tuple(embedding.weight.shape), None, 1), grid)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


class TiedHead(nn.Module):
    """Output head that reuses the vocabulary-parallel embedding table (same layout: vocab x row, hidden x col)."""

    def __init__(self, embedding: VocabParallelEmbedding, grid: ProcessGrid) -> None:
        super().__init__()
        self.grid = grid
        self._embedding = [embedding]  # a list, so the shared table is not registered (and saved) twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = reduce_backward(x, self.grid.groups["row"])
        return reduce_forward(F.linear(x, self._embedding[0].block()), self.grid.groups["col"])


class ParallelNorm(nn.Module):
    """RMSNorm or LayerNorm of a hidden state split over the column group: statistics are summed over the group."""

    def __init__(self, norm: nn.Module, grid: ProcessGrid, width: int) -> None:
        super().__init__()
        self.group, self.width = grid.groups["col"], width
        self.eps = norm.eps
        self.weight = sharded_parameter(norm.weight, Layout((width,), None, 0), grid)
        self.bias = None
        if getattr(norm, "bias", None) is not None:
            self.bias = sharded_parameter(norm.bias, Layout((width,), None, 0), grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        if self.bias is None:  # RMSNorm
            mean_square = reduce_both_ways(x.pow(2).sum(-1, keepdim=True), self.group) / self.width
            return self.weight * (x * torch.rsqrt(mean_square + self.eps)).to(dtype)
        mean = reduce_both_ways(x.sum(-1, keepdim=True), self.group) / self.width
        centered = x - mean
        variance = reduce_both_ways(centered.pow(2).sum(-1, keepdim=True), self.group) / self.width
        return (centered * torch.rsqrt(variance + self.eps)).to(dtype) * self.weight + self.bias


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from logits split over the vocabulary; the full logits never exist on one rank.

    Each rank reduces its slice to two numbers per token, its log-sum-exp (one fused kernel) and the target's logit
    where the target falls in the slice; one all-gather of those pairs replaces three all-reduces (max, sum of
    exponentials, target), and the slice's softmax is formed only in backward, in the buffer that becomes the
    gradient (before: five passes and four slice-sized tensors in forward, one more copy in backward)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, start: int, group, ignore_index: int):
        width = logits.shape[-1]
        local = labels - start
        inside = (local >= 0) & (local < width) & (labels != ignore_index)
        index = local.clamp(0, width - 1)
        picked = torch.where(inside, logits.gather(-1, index.unsqueeze(-1)).squeeze(-1), 0.0)
        pairs = all_gather_flat(torch.cat([torch.logsumexp(logits, dim=-1), picked]), group)
        pairs = pairs.view(-1, 2, logits.shape[0])  # [ranks, (log-sum-exp, target logit), tokens]
        log_normalizer = torch.logsumexp(pairs[:, 0], dim=0)
        counted = labels != ignore_index
        loss = (log_normalizer - pairs[:, 1].sum(0)) * counted
        ctx.save_for_backward(logits, log_normalizer, index, inside, counted)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, log_normalizer, index, inside, counted = ctx.saved_tensors
        grad_logits = torch.sub(logits, log_normalizer.unsqueeze(-1)).exp_()  # this slice's softmax
        # minus one at each target inside the slice, through a flat index (scatter_ walks the whole buffer on CPU)
        flat_target = torch.arange(0, grad_logits.numel(), grad_logits.shape[-1], device=index.device) + index
        grad_logits.view(-1).index_add_(0, flat_target, -inside.to(grad_logits.dtype))
        grad_logits *= (grad * counted).unsqueeze(-1)
        return grad_logits, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, grid: ProcessGrid,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token losses (0 at ignored labels) from this rank's vocabulary slice of the logits."""
    start = grid.index("row") * logits.shape[-1]
    flat = _VocabParallelCrossEntropy.apply(logits.float().flatten(0, -2), labels.flatten(), start,
                                            grid.groups["row"], ignore_index)
    return flat.view(labels.shape)
