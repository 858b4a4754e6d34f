"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Entry points: SamplingConfig and sample_next(logits, config, generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetra.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens; temperature 0 means greedy (argmax)."""

    temperature: float = 0.8  # softmax temperature; 0 = greedy
    top_k: int = 0  # keep only the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = all

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if problems:
            raise ConfigError("Invalid sampling options: " + "; ".join(problems) + ".")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits of tokens outside the top-k / top-p set to -inf (always keeping the best token)."""
    if 0 < top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probabilities = sorted_logits.softmax(dim=-1)
        mass_before = probabilities.cumsum(dim=-1) - probabilities
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from the last-position logits [B, vocab]."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
