"""What differs between one process and one rank of a 4D grid in a training step: the per-token loss, sums over
the ranks that hold other samples, the gradient reduction and the norm.

Entry point: Replica(grid or None); Replica.accumulate runs the forward and backward passes of one optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tetra.config import GoldfishConfig
from tetra.data.batch import Batch, as_batch
from tetra.model import Transformer
from tetra.parallel.collectives import all_reduce
from tetra.parallel.gemm_layout import OUT_IN
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.parallelize import clip_global_grad_norm, gradient_group, parallel_token_losses, sync_gradients
from tetra.parallel.tensor_parallel import TensorParallelLinear, TiedHead, VocabParallelEmbedding
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.chunked_loss import chunked_token_loss
from tetra.train.goldfish import goldfish_drop_mask
from tetra.train.losses import IGNORE_INDEX, per_token_loss, split_loss
from tetra.train.torch_strategies import full_tensor, gradient_sync


@dataclass
class StepLoss:
    """Loss of one optimizer step over the whole global batch."""

    loss: float  # mean over the tokens the loss counts
    dropped_loss: float | None  # mean over the tokens the goldfish mask left out (None when it is off)
    dropped_fraction: float | None  # share of target tokens left out (None when goldfish is off)


def _plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output head when it is a plain bias-free Linear (so the chunked loss can apply it), else None: an
    adapted (LoRA) or split head keeps the ordinary path. Looks through DDP and torch.compile wrappers."""
    core = getattr(model, "module", model)
    core = getattr(core, "_orig_mod", core)
    head = getattr(core, "head", None)
    return head if type(head) is torch.nn.Linear and head.bias is None else None


class Replica:
    """One process (grid None) or this rank's share of a grid."""

    def __init__(self, grid: ProcessGrid | None, zero1: bool = False, strategy: str = "4d",
                 chunked_loss: bool = True) -> None:
        self.grid, self.zero1, self.strategy, self.chunked_loss = grid, zero1, strategy, chunked_loss
        self.progressive: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None  # looped models
        self._buckets_built = False

    @property
    def splits_model(self) -> bool:
        """Whether the model itself is split over a 4D grid (else it runs whole, or under DDP / FSDP2)."""
        return self.grid is not None and self.strategy == "4d"

    def _arm_gradient_buckets(self, model: torch.nn.Module) -> None:
        """Let the model's data-parallel gradient sums start during the coming (last) backward of the step."""
        schedule = getattr(model, "comm_schedule", None)
        if not self.splits_model or schedule is None:
            return
        if not self._buckets_built:
            grid, include_data = self.grid, not self.zero1

            def group_of(parameter: torch.nn.Parameter):
                group = gradient_group(parameter, grid, include_data)  # a group of one sums nothing: no bucket
                return group if group is not None and torch.distributed.get_world_size(group) > 1 else None

            schedule.build_buckets(model, group_of)
            self._buckets_built = True
        schedule.arm()

    def _count_embedding_rows(self, model: torch.nn.Module) -> None:
        """Before the first forward: an untied, unsharded embedding whose gradient the data ranks sum in buckets
        (not ZeRO-1's reduce-scatter) counts the rows its tokens use, so the sum sends only those rows."""
        embed, head = getattr(model, "embed", None), getattr(model, "head", None)
        if (self.splits_model and not self.zero1 and self.grid.size("data") > 1 and self.grid.size("depth") == 1
                and isinstance(embed, VocabParallelEmbedding) and embed.weight.requires_grad
                and not isinstance(head, TiedHead) and getattr(model, "comm_schedule", None) is not None):
            embed.sum_touched_rows_only()

    def token_losses(self, model: torch.nn.Module, tokens: torch.Tensor | Batch) -> torch.Tensor:
        """Per-token next-token losses [B, T] of this rank's [B, T + 1] batch (0 at ignored labels)."""
        head = self._whole_head(model)
        if self.splits_model and head is None:
            return parallel_token_losses(model, tokens, self.grid)
        batch = as_batch(tokens)
        extra = {} if batch.document_ids is None else {"document_ids": batch.document_ids}
        if head is None:
            return per_token_loss(model(batch.inputs, **extra), batch.labels)
        hidden = model(batch.inputs, hidden_only=True, **extra)
        # Read after the forward: FSDP2 holds the root's weights (the head's) unsharded only from there on.
        if isinstance(head, TensorParallelLinear):
            block = head.gathered_block()  # a view of the parameter: the gradient reaches it (and its bucket)
            weight = block if head.gemm_layout == OUT_IN else block.t()
        else:
            weight = head.weight
        return chunked_token_loss(hidden, weight, batch.labels)

    def _whole_head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The head, when the chunked loss can apply it and this rank holds all of it: one process's plain head,
        or on a grid that splits only the batch (row, col and depth 1) its tensor-parallel head, one unsplit block."""
        if not self.chunked_loss:
            return None
        if not self.splits_model:
            return _plain_head(model)
        head = getattr(model, "head", None)
        whole = self.grid.size("model") == 1 and type(head) is TensorParallelLinear and head.bias is None
        return head if whole else None

    def _training_losses(self, model: torch.nn.Module, tokens: Batch) -> torch.Tensor:
        if self.progressive is None:
            return self.token_losses(model, tokens)
        return self.progressive(lambda: self.token_losses(model, tokens))

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over every rank holding other samples (the batch group); a copy, the input is unchanged."""
        values = values.clone()
        return values if self.grid is None else all_reduce(values, self.grid.groups["batch"])

    def accumulate(self, model: torch.nn.Module, batches: list[torch.Tensor | Batch], goldfish: GoldfishConfig,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> StepLoss:
        """Forward and backward over the micro-batches of one step. Every kept token of the global batch weighs the
        same: each micro-batch's summed loss is divided by the global count of kept tokens, known up front because
        the goldfish mask and the loss mask depend on the tokens alone."""
        if not self._buckets_built:
            self._count_embedding_rows(model)
        batches = [as_batch(tokens) for tokens in batches]
        drops = [goldfish_drop_mask(batch.tokens, goldfish) for batch in batches]
        counts = torch.zeros(2, dtype=torch.float64)  # kept, dropped
        for batch, drop in zip(batches, drops, strict=True):
            labelled = batch.labels != IGNORE_INDEX
            dropped = 0 if drop is None else int((drop & labelled).sum())
            counts += torch.tensor([int(labelled.sum()) - dropped, dropped], dtype=torch.float64)
        device = batches[0].tokens.device
        kept_total, dropped_total = (float(value) for value in self.total(counts.to(device)))
        sums = torch.zeros(2, device=device)
        # DDP and FSDP2 average gradients over the ranks; the 4D grid and one process sum them.
        scale = 1.0 if self.strategy == "4d" or self.grid is None else float(self.grid.size("batch"))
        for index, (tokens, drop) in enumerate(zip(batches, drops, strict=True)):
            last = index == len(batches) - 1
            with gradient_sync(model, self.strategy, enabled=last):
                with autocast():
                    losses = split_loss(self._training_losses(model, tokens), drop)
                if last:
                    self._arm_gradient_buckets(model)
                (losses.kept * (scale / max(kept_total, 1.0))).backward()
            sums += torch.stack([losses.kept.detach(), losses.dropped])
        schedule = getattr(model, "comm_schedule", None)
        if schedule is not None:
            schedule.flush()  # every gradient bucket started before the loss sum below uses the same groups
        kept_sum, dropped_sum = (float(value) for value in self.total(sums))
        if not goldfish.enabled:
            return StepLoss(kept_sum / max(kept_total, 1.0), None, None)
        return StepLoss(kept_sum / max(kept_total, 1.0), dropped_sum / dropped_total if dropped_total else None,
                        dropped_total / max(kept_total + dropped_total, 1.0))

    def finish_backward(self, model: Transformer, max_norm: float, optimizer: object) -> float:
        """Reduce gradients where copies exist, then clip the global norm (0 = measure only); returns the norm."""
        if not self.splits_model:
            limit = max_norm if max_norm > 0 else float("inf")
            return float(full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), limit)))
        if isinstance(optimizer, ZeroOptimizer):
            sync_gradients(model, self.grid, include_data=False)
            return optimizer.reduce_and_clip(max_norm)
        sync_gradients(model, self.grid)
        return clip_global_grad_norm(model, self.grid, max_norm)

    @property
    def batch_rank(self) -> int:
        return 0 if self.grid is None else self.grid.index("batch")

    @property
    def batch_ranks(self) -> int:
        return 1 if self.grid is None else self.grid.size("batch")
