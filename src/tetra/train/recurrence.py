"""The recurrence sampler of recurrent-depth training (Geiping et al. 2025): each training forward draws its number
of core iterations r = Poisson(tau) + 1 with tau ~ LogNormal(ln(mean) - sigma^2 / 2, sigma = 0.5), so r averages
`mean_recurrence` + 1 with a heavy tail, and the model (model/recurrent.py) backpropagates through the last
backprop_depth of them. Draws come from torch's global generator, which the trainer seeds and checkpoints save, so
a resumed run draws the same r; every rank draws the same.

Entry point: attach_recurrence_sampler(model) -> the hook handle (remove() to detach).
"""

from __future__ import annotations

import math

import torch
from torch import nn

SIGMA = 0.5


def sample_recurrence(mean: int) -> int:
    """One draw of r (at least 1)."""
    mu = math.log(mean) - SIGMA**2 / 2
    tau = math.exp(mu + SIGMA * float(torch.randn(())))
    return int(torch.poisson(torch.tensor(tau))) + 1


def attach_recurrence_sampler(model: nn.Module):
    """In training mode, every forward call of `model` runs a freshly drawn r; evaluation keeps the mean."""
    mean = model.config.mean_recurrence

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if module.training and kwargs.get("recurrence") is None:
            kwargs["recurrence"] = sample_recurrence(mean)
        return args, kwargs

    return model.register_forward_pre_hook(inject, with_kwargs=True)
