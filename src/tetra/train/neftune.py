"""NEFTune (Jain et al. 2023): during fine-tuning, add uniform noise to the input embeddings,
X + (alpha / sqrt(L * d)) * U(-1, 1), with d the model width and L the number of real tokens of the document
the token belongs to. Counting L per document (not per row) keeps the noise the same whether a document is packed
with others or padded; padding gets no noise. Evaluation and generation are never touched (modules in eval mode).

Applied from outside with two hooks: a pre-hook on the model reads the batch's document ids from the forward call,
and a hook on the token embedding adds the noise. The noise is drawn from torch's global generator, which
checkpoints save and restore, so a resumed run draws the same noise.

On the 4D grid the embedding's output holds this rank's columns of the hidden state: the noise is drawn for the
full width and cut to them, so the ranks of a row group add the same noise and a grid whose batch is not split
(row x col) adds exactly the noise of one process.

Entry point: attach_neftune(model, alpha, grid=None) -> NEFTune (call .remove() to detach).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tetra.parallel.grid import ProcessGrid


def document_lengths(input_ids: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """For every input token, the number of real tokens of its document ([B, T] float; 0 on padding)."""
    if document_ids is None:  # one stream: every row is one sample of T real tokens
        return torch.full(input_ids.shape, float(input_ids.shape[1]), device=input_ids.device)
    same = document_ids[:, :, None] == document_ids[:, None, :]
    lengths = same.sum(-1).float()
    return lengths.masked_fill(document_ids < 0, 0.0)


class NEFTune:
    """The two hooks and the document ids they share for the current forward pass."""

    def __init__(self, model: nn.Module, alpha: float, grid: ProcessGrid | None = None) -> None:
        self.alpha, self.width = alpha, model.config.hidden_size
        self.parts, self.index = (1, 0) if grid is None else (grid.size("col"), grid.index("col"))
        self._documents: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._remember, with_kwargs=True),
                         model.embed.register_forward_hook(self._add_noise)]

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._documents = kwargs.get("document_ids")

    def _add_noise(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lengths = document_lengths(inputs[0], self._documents)
        scale = torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1.0) * self.width),
                            torch.zeros_like(lengths))
        full = (*output.shape[:-1], self.width)
        noise = torch.rand(full, device=output.device, dtype=torch.float32).chunk(self.parts, -1)[self.index] * 2 - 1
        return output + (noise * scale[..., None]).to(output.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def attach_neftune(model: nn.Module, alpha: float, grid: ProcessGrid | None = None) -> NEFTune:
    """Noisy embeddings in training for `model` (a Transformer, not a DDP wrapper: the hooks sit on its modules;
    a grid-split one after parallelize(), with its grid)."""
    return NEFTune(model, alpha, grid)
