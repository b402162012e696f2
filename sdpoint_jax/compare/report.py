"""``compare.csv`` and ``compare.png``: every method's error against GFLOPs per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdpoint_jax.evaluation.selection import pareto_front

Row = dict[str, Any]
COMPARE_CSV = "compare.csv"
COMPARE_PNG = "compare.png"


def plot_compare(rows: Sequence[Row], path: str | Path, *, title: str | None = None) -> None:
    """Top-1 error (%) against GFLOPs per image: each curve's settings as points and its
    Pareto front as a line (the paper's Fig. 2). Stochastic-inference rows (``kind``
    ``"stochastic"``, many passes per image) are left to the CSV."""
    rows = [row for row in rows if row.get("kind") != "stochastic"]
    if not rows:
        raise ValueError("nothing to plot: no comparison rows")
    figure = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, curve in enumerate(dict.fromkeys(row["curve"] for row in rows)):
        curve_rows = [row for row in rows if row["curve"] == curve]
        colour = f"C{index % 10}"
        axes.scatter(
            [row["gflops"] for row in curve_rows],
            [row["top1_error"] for row in curve_rows],
            color=colour,
            alpha=0.4,
            s=14,
        )
        front = pareto_front(curve_rows)
        axes.plot(
            [row["gflops"] for row in front],
            [row["top1_error"] for row in front],
            color=colour,
            marker="o" if len(front) == 1 else ".",
            linewidth=1.5,
            label=curve,
        )
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel("top-1 error (%)")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
