"""Long-context results as tables and a heatmap: accuracy per task and length, one panel per policy.

Entry points: summarize(results) -> {policy: {task: {length: accuracy}}}, format_table, plot_heatmap.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tetra.eval.longctx.runner import SampleResult


def summarize(results: list[SampleResult]) -> dict[str, dict[str, dict[int, float]]]:
    """Mean score per policy, task and length (plus an 'all' task: the mean over tasks)."""
    scores: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for result in results:
        scores[(result.policy, result.task, result.length)].append(result.score)
    table: dict[str, dict[str, dict[int, float]]] = {}
    for (policy, task, length), values in scores.items():
        table.setdefault(policy, {}).setdefault(task, {})[length] = sum(values) / len(values)
    for tasks in table.values():
        lengths = sorted({length for per_length in tasks.values() for length in per_length})
        tasks["all"] = {length: sum(t[length] for t in tasks.values() if length in t) /
                        sum(1 for t in tasks.values() if length in t) for length in lengths}
    return table


def format_table(summary: dict[str, dict[str, dict[int, float]]]) -> str:
    """One block per policy: tasks as rows, lengths as columns (accuracy in %)."""
    lines = []
    for policy, tasks in summary.items():
        lengths = sorted({length for per_length in tasks.values() for length in per_length})
        lines.append(f"{policy}")
        lines.append(f"  {'task':<20}" + "".join(f"{_label(length):>8}" for length in lengths))
        for task, per_length in tasks.items():
            cells = "".join(f"{100 * per_length[length]:>8.1f}" if length in per_length else f"{'-':>8}"
                            for length in lengths)
            lines.append(f"  {task:<20}{cells}")
    return "\n".join(lines)


def _label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def plot_heatmap(summary: dict[str, dict[str, dict[int, float]]], path: str | Path) -> None:
    """A panel per policy: task x length accuracy, annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    policies = list(summary)
    tasks = list(next(iter(summary.values())))
    lengths = sorted({length for per_length in summary[policies[0]].values() for length in per_length})
    columns = min(3, len(policies))
    rows = (len(policies) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * len(lengths) * columns + 2.5, 0.45 * len(tasks) * rows
                                                        + 1.2), squeeze=False)
    for number, policy in enumerate(policies):
        axis = axes[number // columns][number % columns]
        grid = np.array([[summary[policy].get(task, {}).get(length, np.nan) for length in lengths] for task in tasks])
        axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (row, column), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axis.text(column, row, f"{100 * value:.0f}", ha="center", va="center",
                          color="white" if value < 0.6 else "black", fontsize=8)
        axis.set_xticks(range(len(lengths)), [_label(length) for length in lengths])
        axis.set_yticks(range(len(tasks)), tasks if number % columns == 0 else [""] * len(tasks))
        axis.set_title(policy, fontsize=9)
    for number in range(len(policies), rows * columns):
        axes[number // columns][number % columns].axis("off")
    figure.suptitle("Long-context accuracy (%) by task and length")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
