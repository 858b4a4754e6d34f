"""Sampling from a model split over the grid (tensor-parallel decoding): every rank runs the same prompts, its
attention heads (and its KV cache) are its row's share, its hidden state its column's share, and the head's
vocabulary slices are joined so every rank samples from the same full logits. A model too big for one device can
so be sampled and evaluated with the ordinary generation code.

Entry points: prepare_for_decoding(model, grid), load_split_model(path, grid, device).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tetra.model import Transformer
from tetra.model.io import read_model_config
from tetra.model.weight_sources import open_weights
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.materialize import materialize
from tetra.parallel.parallelize import parallelize


class _JoinedVocabulary(nn.Module):
    """The head's logits over this rank's vocabulary rows, gathered over the row group into the full vocabulary."""

    def __init__(self, head: nn.Module, grid: ProcessGrid) -> None:
        super().__init__()
        self.head, self.group, self.parts = head, grid.groups["row"], grid.size("row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.head(x).contiguous()
        if self.group is None:
            return local
        pieces = [torch.empty_like(local) for _ in range(self.parts)]
        dist.all_gather(pieces, local, group=self.group)
        return torch.cat(pieces, dim=-1)


def prepare_for_decoding(model: Transformer, grid: ProcessGrid) -> Transformer:
    """A parallelize()d model, ready for generate_ids: full-vocabulary logits on every rank, and a config that
    describes this rank's share of the heads, so the KV cache (and its memory check) holds only those heads."""
    rows = grid.size("row")
    config = model.config
    model.head = _JoinedVocabulary(model.head, grid)
    model.config = dataclasses.replace(config, n_heads=config.n_heads // rows,
                                       n_kv_heads=config.kv_heads // rows, head_dim=config.resolved_head_dim)
    model.full_config = config
    return model.eval()


def load_split_model(path: str | Path, grid: ProcessGrid, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Transformer:
    """The model at `path` (tetra checkpoint, Hugging Face folder or GGUF file) built on the meta device, split over
    the grid and given only this rank's pieces, then prepared for decoding: no rank ever holds the whole model."""
    config = read_model_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    weights = open_weights(path, model)
    parallelize(model, grid, overlap=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    materialize(model, grid, weights, device, dtype)
    return prepare_for_decoding(model, grid)
