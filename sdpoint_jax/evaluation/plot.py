"""Cost-error plot: top-1 error against GFLOPs per image, one point per instance.

Per-instance batch-norm rows (SDPoint) and uniform ones (the UBN baseline) are drawn in
two colours, each with its Pareto front as a line; further curves (e.g. a cascade) can be
added by name. Rendering uses the Agg canvas directly, never a GUI backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdpoint_jax.core.norm import check_bn_mode
from sdpoint_jax.evaluation.selection import pareto_front

Row = dict[str, Any]

_LABELS = {"instance": "SDPoint (per-instance BN)", "uniform": "UBN (uniform BN)"}
_COLOURS = {"instance": "C0", "uniform": "C1"}
_EXTRA_COLOURS = tuple(f"C{index}" for index in range(2, 10))


def plot_cost_error(
    rows: Sequence[Row],
    path: str | Path,
    *,
    title: str | None = None,
    extra_curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> None:
    """Saves a PNG of top-1 error (%) against GFLOPs to ``path``.

    Args:
      rows: evaluation rows (``gflops``, ``top1_error``, ``bn_mode``); each bn mode
        present gets its own colour, its instances as points and its Pareto front as a
        line.
      path: output file; its directory is created if needed.
      title: optional figure title.
      extra_curves: optional ``name -> [(gflops, top1 error %), ...]`` drawn as further
        lines with markers, in the order given.
    """
    if not rows and not extra_curves:
        raise ValueError("nothing to plot: no rows and no extra curves")
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for mode in dict.fromkeys(row["bn_mode"] for row in rows):
        mode_rows = [row for row in rows if row["bn_mode"] == mode]
        check_bn_mode(mode)
        colour, label = _COLOURS[mode], _LABELS[mode]
        axes.scatter(
            [row["gflops"] for row in mode_rows],
            [row["top1_error"] for row in mode_rows],
            color=colour,
            alpha=0.5,
            s=18,
            label=f"{label}: instances",
        )
        front = pareto_front(mode_rows)
        axes.plot(
            [row["gflops"] for row in front],
            [row["top1_error"] for row in front],
            color=colour,
            linewidth=1.5,
            label=f"{label}: Pareto front",
        )
    for index, (name, points) in enumerate((extra_curves or {}).items()):
        gflops, errors = zip(*sorted(points), strict=True) if points else ((), ())
        colour = _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)]
        axes.plot(gflops, errors, color=colour, marker=".", linewidth=1.5, label=name)
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel("top-1 error (%)")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
