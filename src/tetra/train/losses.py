"""Language-model losses: next-token cross-entropy per token, and its split into the tokens the loss keeps and the
tokens the goldfish mask leaves out.

Entry points: per_token_loss(logits, labels), next_token_loss(model, tokens), split_loss(per_token, dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tetra.data.batch import IGNORE_INDEX
from tetra.model import Transformer

__all__ = ["IGNORE_INDEX", "per_token_loss", "next_token_loss", "split_loss", "LossSums"]


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 cross-entropy per label position, 0 where the label is IGNORE_INDEX; shaped like labels."""
    flat = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")
    return flat.view(labels.shape)


def next_token_loss(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of a [B, T + 1] batch (inputs tokens[:, :-1], labels tokens[:, 1:])."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    counted = int((labels != IGNORE_INDEX).sum())
    return per_token_loss(model(inputs), labels).sum() / max(counted, 1), counted


@dataclass
class LossSums:
    """Summed per-token losses of one micro-batch: the kept part carries the gradient."""

    kept: torch.Tensor  # sum over the tokens the loss counts (with autograd)
    dropped: torch.Tensor  # sum over the tokens the goldfish mask leaves out (detached, for logging)


def split_loss(per_token: torch.Tensor, dropped: torch.Tensor | None) -> LossSums:
    """Split per-token losses by a drop mask (None = nothing dropped)."""
    if dropped is None:
        return LossSums(per_token.sum(), per_token.new_zeros(()))
    return LossSums(per_token.masked_fill(dropped, 0.0).sum(), per_token.detach().masked_fill(~dropped, 0.0).sum())
