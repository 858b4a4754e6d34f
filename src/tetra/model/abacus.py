"""Abacus positions (McLeish et al. 2024): each digit is told its place within its own number, so a model that
learned to add 20-digit numbers can line up the digits of 100-digit ones.

A digit token gets position 1, 2, 3, ... within its run of consecutive digit tokens; every other token gets 0 (a
run also ends where a packed document ends). In training, one random offset k ~ U{0..max_offset} is added to every
non-zero position of a forward pass, so the table's rows beyond the training lengths are trained too; evaluation
uses k = 0. A learned table of max_offset + max_digits + 1 rows is added to the token embeddings.

Decoding with a KV cache continues the run across calls: the cache carries each row's current run length.

Entry points: digit_positions(ids, digit_ids, ...), AbacusEmbedding(config).
"""

from __future__ import annotations

import torch
from torch import nn

from tetra.model.config import ModelConfig


def digit_positions(ids: torch.Tensor, digit_ids: torch.Tensor, previous_run: torch.Tensor | None = None,
                    document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] place of each token within its run of digits (1-based; 0 for non-digits). previous_run [B]: how
    many digits the row's run already had before this chunk (decoding with a cache)."""
    is_digit = torch.isin(ids, digit_ids)
    breaks = ~is_digit
    if document_ids is not None:  # a packed document's first token starts a new run
        previous_document = torch.nn.functional.pad(document_ids, (1, 0), value=-2)[:, :-1]
        breaks = breaks | (document_ids != previous_document)
    counted = is_digit.long().cumsum(-1)
    # The digit count at the last break before each token (the break's own count when it is a digit that starts a
    # new document, minus one, so that digit gets 1).
    at_break = torch.where(breaks, counted - is_digit.long(), torch.zeros_like(counted))
    positions = torch.where(is_digit, counted - at_break.cummax(-1).values, torch.zeros_like(counted))
    if previous_run is not None:
        leading = is_digit & (breaks.long().cumsum(-1) == 0)  # the run that continues from the previous chunk
        positions = positions + leading.long() * previous_run[:, None]
    return positions


class AbacusEmbedding(nn.Module):
    """The learned table of digit places, with the training-time random offset."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.max_offset, self.max_digits = config.abacus_max_offset, config.abacus_max_digits
        self.table = nn.Embedding(self.max_offset + self.max_digits + 1, config.hidden_size)
        self.digit_list = tuple(config.abacus_digit_ids)  # not a buffer: a model built on the meta device keeps it

    def digit_ids(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.digit_list, dtype=torch.long, device=device)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        longest = int(positions.max()) if positions.numel() else 0
        offset = 0
        if self.training and self.max_offset:
            offset = int(torch.randint(0, self.max_offset + 1, ()))
        rows = self.table.weight.shape[0]
        if longest + offset >= rows:
            raise ValueError(f"a number of {longest} digits needs abacus position {longest + offset}, but the table "
                             f"has {rows} rows (model.abacus_max_digits = {self.max_digits}, abacus_max_offset = "
                             f"{self.max_offset}); use shorter numbers or a model built with a larger "
                             "abacus_max_digits")
        shifted = torch.where(positions > 0, positions + offset, positions)
        return self.table(shifted)
