"""Length-controlled win rate (AlpacaEval 2's GLM, SPECS.md section 8): a logistic model of the judge's preference
for the model over the baseline with a model term, a length term phi * tanh(length difference / its std) and,
when known, an instruction-difficulty term; no intercept, L1-regularized, fitted to soft labels. The LC win rate is
the mean predicted preference with the length term set to 0; the raw win rate is the mean preference.

Entry points: WinRates, fit_win_rates(preferences, length_differences, difficulty=None) -> WinRates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

# L1 weight on the coefficients, per instruction-averaged loss: small, it only breaks near-ties between terms.
L1_WEIGHT = 1e-3
BOOTSTRAP_SAMPLES = 200


@dataclass
class WinRates:
    """Percentages with standard errors, and the fitted coefficients."""

    raw_win_rate: float
    raw_standard_error: float
    lc_win_rate: float
    lc_standard_error: float
    model_coefficient: float  # theta_model - theta_baseline
    length_coefficient: float  # phi
    difficulty_coefficient: float  # psi (0 without difficulties)
    instructions: int

    def as_dict(self) -> dict:
        return asdict(self)


def _features(length_differences: np.ndarray, difficulty: np.ndarray | None) -> np.ndarray:
    spread = length_differences.std()
    length_term = np.tanh(length_differences / spread) if spread > 0 else np.zeros_like(length_differences)
    columns = [np.ones_like(length_differences), length_term]
    columns.append(difficulty if difficulty is not None else np.zeros_like(length_differences))
    return np.stack(columns, axis=1)


def _fit(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Coefficients minimizing soft-label cross-entropy + L1, as a smooth problem in (w+, w-) >= 0."""
    width = features.shape[1]

    def objective(split: np.ndarray) -> tuple[float, np.ndarray]:
        weights = split[:width] - split[width:]
        logits = features @ weights
        loss = np.mean(np.logaddexp(0, logits) - labels * logits)
        gradient = features.T @ (1 / (1 + np.exp(-logits)) - labels) / len(labels)
        return loss + L1_WEIGHT * split.sum(), np.concatenate([gradient, -gradient]) + L1_WEIGHT

    result = minimize(objective, np.zeros(2 * width), jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * width))
    return result.x[:width] - result.x[width:]


def _lc_rate(features: np.ndarray, weights: np.ndarray) -> float:
    without_length = weights.copy()
    without_length[1] = 0.0
    return float(100 * np.mean(1 / (1 + np.exp(-(features @ without_length)))))


def fit_win_rates(preferences: list[float], length_differences: list[float],
                  difficulty: list[float] | None = None, seed: int = 0) -> WinRates:
    """preferences[i] in [0, 1]: how much the judge preferred the model's answer to instruction i (1 = model wins);
    length_differences[i]: model answer length minus baseline's (characters or tokens). Standard errors of the LC
    rate come from a bootstrap over instructions."""
    labels = np.clip(np.asarray(preferences, dtype=float), 0, 1)
    lengths = np.asarray(length_differences, dtype=float)
    hardness = None if difficulty is None else np.asarray(difficulty, dtype=float)
    if len(labels) < 2 or len(labels) != len(lengths) or (hardness is not None and len(hardness) != len(labels)):
        raise ValueError("need at least two instructions, with one preference and one length difference each")
    features = _features(lengths, hardness)
    weights = _fit(features, labels)
    generator = np.random.default_rng(seed)
    samples = []
    for _ in range(BOOTSTRAP_SAMPLES):
        rows = generator.integers(0, len(labels), len(labels))
        sample_features = _features(lengths[rows], None if hardness is None else hardness[rows])
        samples.append(_lc_rate(sample_features, _fit(sample_features, labels[rows])))
    return WinRates(float(100 * labels.mean()), float(100 * labels.std(ddof=1) / np.sqrt(len(labels))),
                    _lc_rate(features, weights), float(np.std(samples, ddof=1)), float(weights[0]),
                    float(weights[1]), float(weights[2]), len(labels))
