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
    """(N, D, the best learning rate) for every (N, D) a sweep ran at several rates: the lowest final loss, or, when
    that rate has a sampled rate on each side, the minimum of the parabola through the three in log(lr) (a coarse
    grid, 3x apart say, would otherwise give the same rate everywhere and no law)."""
    groups: dict[tuple[float, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((float(row["non_embedding_params"]), float(row["tokens"])), []).append(row)
    return [(n, d, _interpolated_best(group)) for (n, d), group in sorted(groups.items())
            if len({r["lr"] for r in group}) > 1]


def _interpolated_best(group: list[dict]) -> float:
    ordered = sorted(group, key=lambda row: float(row["lr"]))
    index = min(range(len(ordered)), key=lambda i: float(ordered[i]["loss"]))
    if index in (0, len(ordered) - 1):
        return float(ordered[index]["lr"])
    near = ordered[index - 1:index + 2]
    x = np.log([float(row["lr"]) for row in near])
    curvature, slope, _ = np.polyfit(x, [float(row["loss"]) for row in near], 2)
    if curvature <= 0:
        return float(ordered[index]["lr"])
    return float(np.exp(np.clip(-slope / (2 * curvature), x[0], x[2])))


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
