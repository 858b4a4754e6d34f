"""Draws docs/parallelism.png: how one Linear weight is split over the row and column groups and sharded over depth,
and how ranks are numbered (column innermost). Run: python docs/make_parallelism_diagram.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]


def weight_panel(axis) -> None:
    """W[out, in] on a 2 x 2 (row x col) grid; each block cut in two depth shards."""
    axis.set_title("One Linear weight W[out, in]\nrow=2 x col=2 blocks, each sharded over depth=2", fontsize=10)
    for row in range(2):
        for col in range(2):
            color = COLORS[row * 2 + col]
            for depth in range(2):
                x, y = col * 2.0, (1 - row) * 2.0 + (1 - depth) * 1.0
                axis.add_patch(Rectangle((x + 0.05, y + 0.05), 1.9, 0.9, facecolor=color, alpha=0.45 + 0.35 * depth,
                                         edgecolor="black"))
                rank = (depth * 2 + row) * 2 + col
                axis.text(x + 1.0, y + 0.5, f"rank {rank}\n(row {row}, col {col}, depth {depth})",
                          ha="center", va="center", fontsize=7)
    axis.annotate("", xy=(4.2, 0), xytext=(4.2, 4), arrowprops=dict(arrowstyle="<->"))
    axis.text(4.35, 2, "out features:\nsplit over row", va="center", fontsize=8)
    axis.annotate("", xy=(0, -0.25), xytext=(4, -0.25), arrowprops=dict(arrowstyle="<->"))
    axis.text(2, -0.55, "in features: split over column", ha="center", fontsize=8)
    axis.set_xlim(-0.2, 5.8)
    axis.set_ylim(-0.9, 4.3)
    axis.axis("off")


def flow_panel(axis) -> None:
    """The block's dataflow: no re-layout between a normal and a transposed layer."""
    axis.set_title("A transformer block on the grid", fontsize=10)
    steps = [
        ("hidden state x: split over column (chunk c), same on every row", "#EEEEEE"),
        ("norm: sum of squares all-reduced over column", "#EEEEEE"),
        ("q, k, v (normal): x_c W_rc^T, all-reduce over column -> heads of row r", "#C6DBEF"),
        ("attention on the row's heads (local)", "#EEEEEE"),
        ("o (transposed): all-reduce over row -> hidden chunk c", "#FDD0A2"),
        ("gate, up (normal) -> MLP width of row r; down (transposed) -> chunk c", "#C7E9C0"),
        ("every weight: all-gather over depth before use, reduce-scatter its gradient", "#DADAEB"),
        ("after backward: gradients all-reduced over data (and depth for replicated ones)", "#DADAEB"),
    ]
    for index, (text, color) in enumerate(steps):
        y = len(steps) - index
        axis.add_patch(Rectangle((0, y - 0.4), 10, 0.8, facecolor=color, edgecolor="black"))
        axis.text(5, y, text, ha="center", va="center", fontsize=7.5)
    axis.set_xlim(-0.2, 10.2)
    axis.set_ylim(0.3, len(steps) + 0.7)
    axis.axis("off")


def main() -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    weight_panel(left)
    flow_panel(right)
    figure.suptitle("rank = ((data x G_depth + depth) x G_row + row) x G_col + col", fontsize=10)
    figure.tight_layout()
    out = Path(__file__).with_name("parallelism.png")
    figure.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
