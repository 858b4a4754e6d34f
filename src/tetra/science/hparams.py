"""Hyperparameter laws: the step law (Li et al. 2025) gives the loss-optimal peak learning rate and batch size of
AdamW pretraining from the model and data size alone,

    lr_opt = 1.79 N^-0.713 D^0.307        batch_opt = 0.58 D^0.571 tokens

(N non-embedding parameters, D training tokens), and a user's own sweep can refit the same power-law forms to the
best learning rate it found per (N, D).

Entry points: step_law(params, tokens) -> Hyperparameters, fit_learning_rate_law(rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tetra.errors import ConfigError

LR_COEFFICIENT, LR_PARAMS_EXPONENT, LR_TOKENS_EXPONENT = 1.79, -0.713, 0.307
BATCH_COEFFICIENT, BATCH_TOKENS_EXPONENT = 0.58, 0.571


@dataclass
class Hyperparameters:
    """A peak learning rate and a global batch in tokens (and in sequences of seq_len, rounded)."""

    lr: float
    batch_tokens: float

    def batch_sequences(self, seq_len: int) -> int:
        return max(1, round(self.batch_tokens / seq_len))


def step_law(params: float, tokens: float) -> Hyperparameters:
    """The published step law."""
    if params <= 0 or tokens <= 0:
        raise ConfigError(f"--params and --tokens must be positive (got {params:g}, {tokens:g}).")
    lr = LR_COEFFICIENT * params**LR_PARAMS_EXPONENT * tokens**LR_TOKENS_EXPONENT
    return Hyperparameters(lr, BATCH_COEFFICIENT * tokens**BATCH_TOKENS_EXPONENT)


@dataclass
class LearningRateLaw:
    """lr_opt = c N^a D^b fitted by least squares in log space."""

    coefficient: float
    params_exponent: float
    tokens_exponent: float

    def __call__(self, params: float, tokens: float) -> float:
        return self.coefficient * params**self.params_exponent * tokens**self.tokens_exponent


def best_learning_rates(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(N, D, the learning rate with the lowest final loss) for every (N, D) a sweep ran at several rates."""
    groups: dict[tuple[float, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((float(row["non_embedding_params"]), float(row["tokens"])), []).append(row)
    return [(n, d, float(min(group, key=lambda r: r["loss"])["lr"])) for (n, d), group in sorted(groups.items())
            if len({r["lr"] for r in group}) > 1]


def fit_learning_rate_law(rows: list[dict]) -> LearningRateLaw:
    """The step law's form refitted to a sweep's best learning rates (needs several N and several D)."""
    best = best_learning_rates(rows)
    if len({n for n, _, _ in best}) < 2 or len({d for _, d, _ in best}) < 2 or len(best) < 3:
        raise ConfigError("Fitting a learning-rate law needs runs at several learning rates for at least three "
                          "(model size, token budget) points with two sizes and two budgets; the sweep has "
                          f"{len(best)} such points. Add lrs = [...] with two or more values to the sweep.")
    design = np.array([[1.0, np.log(n), np.log(d)] for n, d, _ in best])
    target = np.log([lr for _, _, lr in best])
    (log_c, a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    return LearningRateLaw(float(np.exp(log_c)), float(a), float(b))
