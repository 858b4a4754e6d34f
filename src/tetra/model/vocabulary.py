"""Growing a model's vocabulary for added tokens: new embedding (and untied head) rows start at the mean of the
existing rows, the usual choice that keeps the new tokens' first logits unremarkable.

Entry points: grow_vocabulary(model, vocab_size) -> the number of rows added; reset_rows_to_mean(model, first,
last) for added tokens that land in a table's spare rows.
"""

from __future__ import annotations

import torch
from torch import nn

from tetra.model.transformer import Transformer


def _grown(table: torch.Tensor, rows: int) -> nn.Parameter:
    mean = table.detach().float().mean(dim=0, keepdim=True).to(table.dtype)
    return nn.Parameter(torch.cat([table.detach(), mean.expand(rows, -1)]), requires_grad=table.requires_grad)


def grow_vocabulary(model: Transformer, vocab_size: int) -> int:
    """Give the model `vocab_size` token rows (in place); returns how many were added (0 if it had enough)."""
    added = vocab_size - model.config.vocab_size
    if added <= 0:
        return 0
    with torch.no_grad():
        model.embed.weight = _grown(model.embed.weight, added)
        model.embed.num_embeddings = vocab_size
        if model.config.tie_embeddings:
            model.head.weight = model.embed.weight
        else:
            model.head.weight = _grown(model.head.weight, added)
        model.head.out_features = vocab_size
    model.config.vocab_size = vocab_size
    return added


def reset_rows_to_mean(model: Transformer, first: int, last: int) -> None:
    """Token rows [first, last) (added tokens) set to the mean of the rows before them, in the embedding and an
    untied head: a model whose table already had unused rows past its tokenizer gets the same start as a grown one."""
    tables = [model.embed.weight] if model.config.tie_embeddings else [model.embed.weight, model.head.weight]
    with torch.no_grad():
        for table in tables:
            table[first:last] = table[:first].float().mean(dim=0).to(table.dtype)
