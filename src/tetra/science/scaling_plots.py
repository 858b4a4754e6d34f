"""The pictures of a scaling fit: loss against FLOPs with the law's compute-optimal frontier, isoFLOP curves (loss
against model size at fixed compute, the law's and the nearest runs'), and residuals (observed over predicted).

Entry point: plot_fit(rows, law, path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tetra.science.scaling_fit import ScalingLaw


def plot_fit(rows: list[dict], law: ScalingLaw, features: np.ndarray, path: str | Path) -> None:
    """Three panels into one PNG; the frontier and isoFLOP panels need the chinchilla law (N, D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.array([row["loss"] for row in rows])
    flops = np.array([row["flops"] for row in rows])
    params = np.array([row["non_embedding_params"] for row in rows])
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    points = left.scatter(flops, losses, c=np.log10(params), cmap="viridis", s=18)
    figure.colorbar(points, ax=left, label="log10 non-embedding parameters")
    if len(law.names) == 2:
        budgets = np.geomspace(flops.min(), flops.max() * 10, 60)
        optimal = np.array([law.compute_optimal(c) for c in budgets])
        left.plot(budgets, law.predict(optimal), color="black", label="fitted compute-optimal frontier")
        for budget in np.geomspace(flops.min(), flops.max(), 4):
            sizes = np.geomspace(params.min() / 3, params.max() * 3, 80)
            middle.plot(sizes, law.predict(np.stack([sizes, budget / (6 * sizes)], 1)), label=f"C = {budget:.1e}")
            near = np.abs(np.log(flops / budget)) < 0.35
            middle.scatter(params[near], losses[near], s=14)
        middle.set_xscale("log")
        middle.set_xlabel("non-embedding parameters")
        middle.set_ylabel("loss")
        middle.set_title("isoFLOP curves (law) and runs within 1.4x of each budget")
        middle.legend(fontsize=7)
    else:
        middle.axis("off")
        middle.text(0.5, 0.5, "isoFLOP curves need the chinchilla law", ha="center")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("training FLOPs (6 N D)")
    left.set_ylabel("loss")
    if len(law.names) == 2:  # the frontier is the only labelled line
        left.legend(fontsize=8)
    left.set_title("loss against compute")
    predicted = law.predict(features)
    right.scatter(predicted, losses / predicted - 1, s=14)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_xlabel("predicted loss")
    right.set_ylabel("observed / predicted - 1")
    right.set_title("residuals")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
