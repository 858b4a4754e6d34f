"""Language-model losses on hidden states: next-token cross-entropy, with labels that may be ignored.

Entry point: next_token_loss(model, tokens) -> (mean loss over counted labels, number of counted labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tetra.model import Transformer

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 over labels that are not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def next_token_loss(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of a [B, T + 1] batch (inputs tokens[:, :-1], labels tokens[:, 1:])."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    counted = int((labels != IGNORE_INDEX).sum())
    return cross_entropy_sum(logits, labels) / max(counted, 1), counted
