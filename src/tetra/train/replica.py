"""What differs between one process and one rank of a 4D grid in a training step: the loss, the gradient
reduction and norm, and the reported mean loss.

Entry point: Replica(grid or None).
"""

from __future__ import annotations

import torch

from tetra.model import Transformer
from tetra.parallel.collectives import all_reduce
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.parallelize import clip_global_grad_norm, parallel_next_token_loss, sync_gradients
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.losses import next_token_loss


class Replica:
    """One process (grid None) or this rank's share of a grid."""

    def __init__(self, grid: ProcessGrid | None) -> None:
        self.grid = grid

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss to backpropagate, this rank's summed loss, labels the backpropagated loss is normalized by)."""
        if self.grid is None:
            loss, counted = next_token_loss(model, tokens)
            return loss, loss.detach() * counted, counted
        global_labels = tokens[:, 1:].numel() * self.grid.size("batch")
        backward_loss, loss_sum = parallel_next_token_loss(model, tokens, self.grid, global_labels)
        return backward_loss, loss_sum, global_labels

    def finish_backward(self, model: Transformer, max_norm: float, optimizer: object) -> float:
        """Reduce gradients where copies exist, then clip the global norm (0 = measure only); returns the norm."""
        if self.grid is None:
            limit = max_norm if max_norm > 0 else float("inf")
            return float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
        if isinstance(optimizer, ZeroOptimizer):
            sync_gradients(model, self.grid, include_data=False)
            return optimizer.reduce_and_clip(max_norm)
        sync_gradients(model, self.grid)
        return clip_global_grad_norm(model, self.grid, max_norm)

    def mean(self, loss_sum: torch.Tensor, labels: int) -> float:
        """The mean loss over every rank's samples."""
        if self.grid is not None:
            loss_sum = all_reduce(loss_sum.clone(), self.grid.groups["batch"])
        return loss_sum.item() / labels

    @property
    def batch_rank(self) -> int:
        return 0 if self.grid is None else self.grid.index("batch")

    @property
    def batch_ranks(self) -> int:
        return 1 if self.grid is None else self.grid.size("batch")
