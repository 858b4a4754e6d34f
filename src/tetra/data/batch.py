"""One training micro-batch: the token rows, which targets the loss counts, and (for packed documents) which
document each input token belongs to.

Entry points: Batch, as_batch(tokens or Batch), IGNORE_INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # a label the loss skips (cross_entropy's ignore_index)


@dataclass
class Batch:
    """[B, T + 1] tokens; inputs are tokens[:, :-1], targets tokens[:, 1:]."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor | None = None  # [B, T] bool: targets the loss counts (None: every target)
    document_ids: torch.Tensor | None = None  # [B, T] packed-document index of each input (None: one stream)

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        """Targets with IGNORE_INDEX where the loss mask leaves them out."""
        labels = self.tokens[:, 1:]
        return labels if self.loss_mask is None else labels.masked_fill(~self.loss_mask, IGNORE_INDEX)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda value: None if value is None else value.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.tokens), move(self.loss_mask), move(self.document_ids))


def as_batch(value: torch.Tensor | Batch) -> Batch:
    """A plain [B, T + 1] token tensor is a batch of one stream with every target counted."""
    return value if isinstance(value, Batch) else Batch(value)
