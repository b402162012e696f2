"""``compare.csv`` and ``compare.png``: every method's error against GFLOPs per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdpoint_jax.evaluation.selection import pareto_front

Row = dict[str, Any]
COMPARE_CSV = "compare.csv"
COMPARE_PNG = "compare.png"


LINE_STYLES = ("-", "--", ":", "-.")


def plot_compare(rows: Sequence[Row], path: str | Path, *, title: str | None = None) -> None:
    """Top-1 error (%) against GFLOPs per image: each curve's settings as points and its
    Pareto front as a line (the paper's Fig. 2). A method's curves (e.g. ``msdnet`` and
    ``msdnet-budgeted``, ``sdpoint`` and ``sdpoint-ubn``) share its colour, in line
    styles in the order they come; up to 20 methods get distinct colours. The legend
    sits right of the axes. Stochastic-inference rows (``kind`` ``"stochastic"``, many
    passes per image) are left to the CSV."""
    rows = [row for row in rows if row.get("kind") != "stochastic"]
    if not rows:
        raise ValueError("nothing to plot: no comparison rows")
    methods = list(dict.fromkeys(row["method"] for row in rows))
    palette = [f"C{index}" for index in range(10)]
    if len(methods) > len(palette):
        palette = [colormaps["tab20"](index) for index in range(20)]
    figure = Figure(figsize=(9.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method_index, method in enumerate(methods):
        colour = palette[method_index % len(palette)]
        curves = dict.fromkeys(row["curve"] for row in rows if row["method"] == method)
        for curve_index, curve in enumerate(curves):
            curve_rows = [row for row in rows if row["curve"] == curve]
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
                linestyle=LINE_STYLES[curve_index % len(LINE_STYLES)],
                marker="o" if len(front) == 1 else ".",
                linewidth=1.5,
                label=curve,
            )
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel("top-1 error (%)")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
