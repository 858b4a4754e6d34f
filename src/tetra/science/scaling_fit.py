"""Scaling-law fits by Chinchilla's approach 3 (Hoffmann et al. 2022), as Gemstones uses them: a loss that is an
irreducible term plus one power law per resource,

    L(x) = E + sum_i A_i / x_i^alpha_i        (chinchilla: x = (N, D); width-depth: x = (width, depth, D))

fitted by minimizing the Huber loss (delta 1e-3) between log L_observed and log L_predicted, written as
log L = logsumexp(e, a_i - alpha_i log x_i) with E = exp(e), A_i = exp(a_i), by L-BFGS from every point of a grid
of starts (alpha in 0..2, a in 0..25, e in -1..1), keeping the best. Bootstrap refits on resampled runs give
confidence intervals; for the chinchilla law, the compute-optimal N and D of a budget C = 6 N D follow in closed
form.

Entry points: fit_law(features, losses, ...), bootstrap(...), ScalingLaw (predict, compute_optimal).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from tetra.errors import ConfigError

HUBER_DELTA = 1e-3
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)
LOG_COEFFICIENTS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
LOG_IRREDUCIBLE = (-1.0, -0.5, 0.0, 0.5, 1.0)
MAX_STARTS = 4500  # the full grid for two resources; a seeded sample of it for more


@dataclass
class ScalingLaw:
    """E + sum_i A_i x_i^-alpha_i over the named resources."""

    names: tuple[str, ...]
    E: float
    A: tuple[float, ...]
    alpha: tuple[float, ...]
    objective: float = 0.0  # the summed Huber loss at the optimum

    @classmethod
    def from_vector(cls, names: tuple[str, ...], theta: np.ndarray, objective: float = 0.0) -> ScalingLaw:
        k = len(names)
        return cls(names, float(math.exp(theta[0])), tuple(float(math.exp(v)) for v in theta[1:k + 1]),
                   tuple(float(v) for v in theta[k + 1:]), float(objective))

    def vector(self) -> np.ndarray:
        return np.array([math.log(self.E), *(math.log(a) for a in self.A), *self.alpha])

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Losses for rows of resources [n, k] (in the order of `names`)."""
        features = np.atleast_2d(np.asarray(features, dtype=float))
        return self.E + sum(a * features[:, i] ** -al for i, (a, al) in enumerate(zip(self.A, self.alpha,
                                                                                        strict=True)))

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimizing L(N, D) with 6 N D = flops (the chinchilla law: names (params, tokens))."""
        if len(self.names) != 2:
            raise ConfigError("The compute-optimal allocation needs the chinchilla law (parameters and tokens).")
        (a, b), (alpha, beta) = self.A, self.alpha
        g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
        params = g * (flops / 6) ** (beta / (alpha + beta))
        return params, flops / (6 * params)

    def as_dict(self) -> dict:
        return {"parameters": dict(zip(("E", *(f"A_{n}" for n in self.names), *(f"alpha_{n}" for n in self.names)),
                                (self.E, *self.A, *self.alpha), strict=True)), "objective": self.objective}


def _objective(theta: np.ndarray, logs: np.ndarray, log_loss: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log-space residuals, and its gradient."""
    k = logs.shape[1]
    terms = np.concatenate([np.full((logs.shape[0], 1), theta[0]), theta[1:k + 1] - theta[k + 1:] * logs], axis=1)
    predicted = logsumexp(terms, axis=1)
    residual = predicted - log_loss
    huber = np.where(np.abs(residual) <= delta, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    slope = np.clip(residual, -delta, delta)
    weights = np.exp(terms - predicted[:, None])  # d predicted / d term
    grad_terms = slope[:, None] * weights
    gradient = np.concatenate([[grad_terms[:, 0].sum()], grad_terms[:, 1:].sum(0),
                               -(grad_terms[:, 1:] * logs).sum(0)])
    return float(huber.sum()), gradient


def grid_of_starts(k: int, limit: int = MAX_STARTS, seed: int = 0) -> np.ndarray:
    """Starting points (e, a_1..a_k, alpha_1..alpha_k): the whole grid, or a seeded sample of it when larger."""
    sizes = [len(LOG_IRREDUCIBLE)] + [len(LOG_COEFFICIENTS)] * k + [len(ALPHAS)] * k
    total = math.prod(sizes)
    axes = [LOG_IRREDUCIBLE] + [LOG_COEFFICIENTS] * k + [ALPHAS] * k
    if total <= limit:
        return np.array(list(itertools.product(*axes)))
    rng = np.random.default_rng(seed)
    return np.array([[axis[i] for axis, i in zip(axes, index, strict=True)]
                     for index in zip(*(rng.integers(0, s, limit) for s in sizes), strict=True)])


def _check(features: np.ndarray, losses: np.ndarray, names: tuple[str, ...]) -> None:
    if features.ndim != 2 or features.shape[1] != len(names) or len(losses) != features.shape[0]:
        raise ConfigError(f"A fit needs one row of {len(names)} resources ({', '.join(names)}) per loss; got "
                          f"{features.shape} for {len(losses)} losses.")
    if len(losses) < 2 * len(names) + 2:
        raise ConfigError(f"{len(losses)} runs are too few to fit {2 * len(names) + 1} parameters; add runs "
                          "(more shapes or token budgets) or relax --exclude.")
    if not (np.all(features > 0) and np.all(losses > 0) and np.all(np.isfinite(losses))):
        raise ConfigError("Every resource and loss must be positive and finite; check the sweep table for "
                          "failed or empty runs.")


def fit_law(features: np.ndarray, losses: np.ndarray, names: tuple[str, ...], delta: float = HUBER_DELTA,
            starts: np.ndarray | None = None) -> ScalingLaw:
    """The best of L-BFGS runs from every start (default: the grid of starts)."""
    features, losses = np.asarray(features, dtype=float), np.asarray(losses, dtype=float)
    _check(features, losses, names)
    logs, log_loss = np.log(features), np.log(losses)
    starts = grid_of_starts(len(names)) if starts is None else np.atleast_2d(starts)
    best_value, best_theta = math.inf, None
    for start in starts:
        result = minimize(_objective, start, args=(logs, log_loss, delta), jac=True, method="L-BFGS-B")
        if result.fun < best_value:
            best_value, best_theta = float(result.fun), result.x
    return ScalingLaw.from_vector(names, best_theta, best_value)


def bootstrap(features: np.ndarray, losses: np.ndarray, law: ScalingLaw, resamples: int = 200, seed: int = 0,
              delta: float = HUBER_DELTA) -> list[ScalingLaw]:
    """Refits on runs drawn with replacement, each started from the full fit and a few nearby grid points (a full
    grid per resample would cost `resamples` times the fit)."""
    features, losses = np.asarray(features, dtype=float), np.asarray(losses, dtype=float)
    rng = np.random.default_rng(seed)
    center = law.vector()
    starts = np.vstack([center, center + rng.normal(0, 0.3, (4, center.size))])
    fits = []
    for _ in range(resamples):
        rows = rng.integers(0, len(losses), len(losses))
        if len(np.unique(rows)) < 2 * len(law.names) + 2:
            continue  # too few distinct runs to pin the law down
        fits.append(fit_law(features[rows], losses[rows], law.names, delta, starts))
    return fits


def intervals(fits: list[ScalingLaw], level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every parameter over the bootstrap fits."""
    if not fits:
        return {}
    names = fits[0].names
    values = {"E": [f.E for f in fits]}
    for i, name in enumerate(names):
        values[f"A_{name}"] = [f.A[i] for f in fits]
        values[f"alpha_{name}"] = [f.alpha[i] for f in fits]
    tail = 100 * (1 - level) / 2
    return {key: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for key, v in values.items()}
