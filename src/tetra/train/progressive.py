"""The progressive loss of looped transformers (Bansal et al. 2022, as the abacus paper of McLeish et al. 2024 trains
its looped models): besides the loss after the model's R passes, each step also scores the output after n + k
passes with the gradient through the last k only, n ~ U{0..R-1}, k ~ U{1..R-n}:

    loss = (1 - alpha) * L(R passes) + alpha * L(n + k passes, gradient through the last k)

The first n passes run without autograd, so the stack learns to improve whatever state it is handed rather than
to count passes, which is what lets a looped model run more passes at test time than in training. n and k come
from torch's generator, which the trainer seeds and checkpoints save, so a resumed run draws the same.

Entry point: ProgressiveLoss(model, alpha)(token_losses) -> the combined per-token losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ProgressiveLoss:
    """Per-token losses mixed from the full loop and a partial one; a looped model (model.loop > 0) only."""

    def __init__(self, model: nn.Module, alpha: float) -> None:
        self.model, self.alpha, self.loops = model, alpha, model.config.loop

    def draw(self) -> tuple[int, int]:
        """(n, k): passes without gradient, then passes with it."""
        without = int(torch.randint(0, self.loops, ()))
        return without, int(torch.randint(1, self.loops - without + 1, ()))

    def __call__(self, token_losses: Callable[[], torch.Tensor]) -> torch.Tensor:
        """token_losses runs the model on the step's batch and returns its per-token losses."""
        full = token_losses() if self.alpha < 1 else None
        without, tracked = self.draw()

        def shorten(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs.update(recurrence=without + tracked, backprop_depth=tracked)
            return args, kwargs

        handle = self.model.register_forward_pre_hook(shorten, with_kwargs=True)
        try:
            partial = token_losses()
        finally:
            handle.remove()
        return partial if full is None else (1 - self.alpha) * full + self.alpha * partial
