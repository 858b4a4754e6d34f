"""parallelize(model, grid): swap a Transformer's layers for tensor-parallel ones in place (the model file is not
edited), then the helpers a training step needs: gradient sync, the global gradient norm, and full state dicts.

Entry points: parallelize, linear_block_shapes, gradient_group, sync_gradients, clip_global_grad_norm, full_state_dict,
parallel_token_losses, parallel_next_token_loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from tetra.data.batch import IGNORE_INDEX, Batch, as_batch
from tetra.model import Transformer
from tetra.parallel.collectives import all_reduce
from tetra.parallel.column_linear import ColumnGatheredLinear
from tetra.parallel.gemm_layout import OUT_IN, Shape
from tetra.parallel.gradient_norm import clip_to_norm, local_square_sum
from tetra.parallel.grid import ProcessGrid, check_grid
from tetra.parallel.layout import unshard
from tetra.parallel.overlap import CommSchedule
from tetra.parallel.tensor_parallel import (
    ColumnSplitEmbedding,
    ParallelNorm,
    TensorParallelLinear,
    TiedHead,
    VocabParallelEmbedding,
    linear_weight_layout,
    vocab_parallel_cross_entropy,
)
from tetra.parallel.tensor_parallel_lora import TensorParallelLoRALinear, is_lora_linear


def _split_linears(model: Transformer) -> Iterator[tuple[nn.Module, str, bool]]:
    """(owner, attribute, transposed) of every Linear the grid splits. Attention heads and the MLP width are split
    over rows, the hidden state over columns; q/k/v, gate/up and the head are 'normal' layers, o and down
    'transposed' ones, so no activation is ever re-laid out between them."""
    for block in model.blocks:
        for name in ("q", "k", "v"):
            yield block.attn, name, False
        yield block.attn, "o", True
        for name in ("gate", "up"):
            if getattr(block.mlp, name) is not None:
                yield block.mlp, name, False
        yield block.mlp, "down", True
    if not model.config.tie_embeddings:
        yield model, "head", False


def linear_block_shapes(model: Transformer, grid: ProcessGrid) -> list[Shape]:
    """The [out, in] block of every split Linear on this grid (what its GEMMs multiply), in forward order."""
    return [linear_weight_layout(getattr(owner, name).weight.shape, transposed).block_shape(grid)
            for owner, name, transposed in _split_linears(model)]


def parallelize(model: Transformer, grid: ProcessGrid, overlap: bool = True,
                gemm_layouts: Mapping[Shape, str] | None = None, regather: bool = False) -> Transformer:
    """Replace every layer by its grid-split version (see _split_linears for who splits what). The model's
    collectives share one CommSchedule (model.comm_schedule); overlap=False makes every collective blocking, with
    bit-identical results. gemm_layouts maps a Linear's block shape (linear_block_shapes) to the layout it is
    stored in (gemm_layout.py; choose_layouts); shapes not in it keep torch's [out, in]. regather: depth-sharded
    Linears gather their block again in backward rather than keep it from forward (less memory, one more
    all-gather per layer; bit-identical results). Off by default: on the machines measured so far the extra
    gathers cost more time than the held blocks cost memory. A LoRA-adapted Linear keeps its adapter, split with
    its frozen base (tensor_parallel_lora.py); frozen parameters stay frozen."""
    check_grid(grid.shape, model.config)
    schedule = CommSchedule(overlap, regather=regather)
    layouts = dict(gemm_layouts or {})
    for (owner, name, transposed), shape in zip(list(_split_linears(model)), linear_block_shapes(model, grid),
                                                strict=True):
        linear = getattr(owner, name)
        split = TensorParallelLoRALinear if is_lora_linear(linear) else TensorParallelLinear
        setattr(owner, name, split(linear, grid, transposed, schedule, layouts.get(shape, OUT_IN)))
    width = model.config.hidden_size
    model.embed = VocabParallelEmbedding(model.embed, grid)
    if model.pos_embed is not None:
        model.pos_embed = ColumnSplitEmbedding(model.pos_embed, grid)
    if model.abacus is not None:  # digit places: every row on every rank, the hidden size over columns
        model.abacus.table = ColumnSplitEmbedding(model.abacus.table, grid)
    for block in model.blocks:
        block.attn_norm = ParallelNorm(block.attn_norm, grid, width)
        block.mlp_norm = ParallelNorm(block.mlp_norm, grid, width)
        if hasattr(block, "attn_post_norm"):  # a recurrent-depth model's sandwich blocks
            block.attn_post_norm = ParallelNorm(block.attn_post_norm, grid, width)
            block.mlp_post_norm = ParallelNorm(block.mlp_post_norm, grid, width)
    if model.config.recurrent:  # the adapter maps the column-split state to itself (a looped stack has none)
        model.recurrence.state = ColumnGatheredLinear(model.recurrence.state, grid)
        model.recurrence.inject = ColumnGatheredLinear(model.recurrence.inject, grid)
        model.recurrence.width_parts, model.recurrence.width_index = grid.size("col"), grid.index("col")
    model.norm = ParallelNorm(model.norm, grid, width)
    if model.config.tie_embeddings:
        model.head = TiedHead(model.embed, grid)
    if grid.size("depth") > 1:  # forward order, for prefetching each next layer's weights
        schedule.set_forward_order([module for module in model.modules() if isinstance(module, TensorParallelLinear)])
    model.comm_schedule = schedule
    return model


def gradient_group(parameter: nn.Parameter, grid: ProcessGrid, include_data: bool = True):
    """The ranks whose copies of this gradient must be summed: depth-sharded weights were already summed over depth
    by their reduce-scatter, so only over data; everything else (replicated over depth) over data x depth.
    include_data=False leaves the data sum to a ZeRO-1 optimizer's reduce-scatter."""
    layout = getattr(parameter, "tetra_layout", None)
    depth_sharded = layout is not None and layout.depth
    if include_data:
        return grid.groups["data"] if depth_sharded else grid.groups["batch"]
    return None if depth_sharded else grid.groups["depth"]


def sync_gradients(model: nn.Module, grid: ProcessGrid, include_data: bool = True) -> None:
    """Wait for the model's pending collectives, then sum every gradient its bucketed backward did not already sum
    over its gradient_group."""
    schedule = getattr(model, "comm_schedule", None)
    reduced = schedule.finish() if schedule is not None else set()
    for parameter in model.parameters():
        if parameter.grad is not None and id(parameter) not in reduced:
            all_reduce(parameter.grad, gradient_group(parameter, grid, include_data))


def clip_global_grad_norm(model: nn.Module, grid: ProcessGrid, max_norm: float) -> float:
    """Clip to the norm of the whole (unsharded) gradient; each replicated piece is counted once."""
    pieces = []
    for parameter in model.parameters():
        if parameter.grad is not None:
            layout = getattr(parameter, "tetra_layout", None)
            pieces.append((parameter.grad, layout.copies(grid) if layout is not None else grid.size("model")))
    norm = math.sqrt(float(all_reduce(local_square_sum(pieces), grid.groups["model"])))
    clip_to_norm((p for p in model.parameters() if p.grad is not None), max_norm, norm)
    return norm


def full_state_dict(model: nn.Module, grid: ProcessGrid, gradients: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) as the full, unsplit tensor, on every rank, under its single-process name."""
    state = {}
    for name, parameter in model.named_parameters():
        value = parameter.grad if gradients else parameter.data
        layout = getattr(parameter, "tetra_layout", None)
        state[name] = value.detach().clone() if layout is None else unshard(value.detach(), layout, grid)
    return state


def parallel_token_losses(model: Transformer, tokens: torch.Tensor | Batch, grid: ProcessGrid) -> torch.Tensor:
    """Per-token next-token losses [B, T] of a [B, T + 1] batch, from the vocabulary-parallel logits."""
    batch = as_batch(tokens)
    extra = {} if batch.document_ids is None else {"document_ids": batch.document_ids}
    return vocab_parallel_cross_entropy(model(batch.inputs, **extra), batch.labels, grid, IGNORE_INDEX)


def parallel_next_token_loss(model: Transformer, tokens: torch.Tensor | Batch, grid: ProcessGrid,
                             global_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, this rank's loss sum). Dividing by the global label count makes the gradients,
    summed over the batch group, those of the mean loss over the whole global batch."""
    loss_sum = parallel_token_losses(model, tokens, grid).sum()
    return loss_sum / global_labels, loss_sum.detach()
