"""Choosing an instance for a cost budget from evaluation results.

Rows are those of :func:`sdpoint_jax.evaluation.evaluate.evaluate_instances` (``point``, ``ratio``,
``gflops``, ``top1_error``, ``bn_mode``, ...). A latency budget joins them with latency
rows ``{"point", "ratio", "batch", "median_ms"}`` of a latency benchmark.

:func:`select_run` is the ``select`` command: it reads a run directory's
``results.json`` (and ``latency.json`` with ``--budget-ms``) and needs neither JAX nor
TensorFlow, so it answers at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdpoint_jax.training.run_dir import RunDir, read_results
from sdpoint_jax.xla_cpu.compiler_options import timed_option_set

Row = dict[str, Any]


def pareto_front(rows: Sequence[Row], *, cost: str = "gflops") -> list[Row]:
    """The rows no cheaper row beats, sorted by ``cost``.

    A row is kept iff its ``top1_error`` is strictly lower than that of every row with
    a lower ``cost``; of rows with equal cost only the one with the lowest error can be
    kept (the first of them on an exact tie).
    """
    front: list[Row] = []
    for row in sorted(rows, key=lambda row: (row[cost], row["top1_error"])):
        if not front or row["top1_error"] < front[-1]["top1_error"]:
            front.append(row)
    return front


def _instance_id(row: Row) -> tuple[int, float]:
    return int(row["point"]), float(row["ratio"])


def _with_latency(rows: Sequence[Row], latency_rows: Sequence[Row], batch: int | None) -> list[Row]:
    """``rows`` with ``median_ms`` (and ``batch``) of the same instance added.

    ``batch`` picks one batch size of the benchmark; it may be omitted when the
    benchmark measured only one. Where the benchmark timed an instance under several
    compiler option sets (``compiler_options``), the fastest counts: the server compiles
    each program with that set.
    """
    sizes = sorted({int(row["batch"]) for row in latency_rows})
    if not sizes:
        raise ValueError("budget_ms needs latency_rows, got none")
    if batch is None:
        if len(sizes) > 1:
            raise ValueError(f"latency rows cover batch sizes {sizes}; pass batch=one of them")
        batch = sizes[0]
    elif batch not in sizes:
        raise ValueError(f"no latency rows for batch {batch}; measured batch sizes: {sizes}")
    by_options: dict[tuple[int, float], dict[str, float]] = {}
    for row in latency_rows:
        if int(row["batch"]) != batch:
            continue
        options = by_options.setdefault(_instance_id(row), {})
        option_set = timed_option_set(row)
        if option_set in options:
            raise ValueError(
                f"two latency rows for instance {_instance_id(row)} at batch {batch} "
                f"with compiler options {option_set!r}"
            )
        options[option_set] = float(row["median_ms"])
    latency = {instance: min(times.values()) for instance, times in by_options.items()}
    missing = sorted({_instance_id(row) for row in rows} - latency.keys())
    if missing:
        raise ValueError(f"no latency at batch {batch} for instances (point, ratio) {missing}")
    return [{**row, "batch": batch, "median_ms": latency[_instance_id(row)]} for row in rows]


def select_instance(
    rows: Sequence[Row],
    *,
    budget_gflops: float | None = None,
    budget_ms: float | None = None,
    latency_rows: Sequence[Row] | None = None,
    batch: int | None = None,
    bn_mode: str = "instance",
) -> Row:
    """The most accurate instance of ``bn_mode`` whose cost fits the budget.

    Exactly one budget: ``budget_gflops`` (GFLOPs per image, from the rows) or
    ``budget_ms`` (median milliseconds per batch, from ``latency_rows`` at batch size
    ``batch``, joined on ``(point, ratio)``). Among the rows of ``bn_mode`` on the Pareto
    front of that cost with cost ``<= budget``, returns the one with the lowest top-1
    error: a copy of its row, plus ``batch`` and ``median_ms`` for a latency budget.

    Raises:
      ValueError: both or neither budget; ``budget_ms`` without latency rows, with an
        ambiguous or unknown ``batch``, or with instances lacking a latency; no rows of
        ``bn_mode``; or no instance within the budget (the message names the budget and
        the cheapest cost available).
    """
    if (budget_gflops is None) == (budget_ms is None):
        raise ValueError(
            f"pass exactly one of budget_gflops and budget_ms, got budget_gflops="
            f"{budget_gflops} and budget_ms={budget_ms}"
        )
    candidates = [row for row in rows if row["bn_mode"] == bn_mode]
    if not candidates:
        modes = sorted({row["bn_mode"] for row in rows})
        raise ValueError(f"no rows with bn_mode {bn_mode!r}; the rows have bn modes {modes}")
    if budget_gflops is not None:
        cost, unit, budget = "gflops", "GFLOPs", budget_gflops
    else:
        candidates = _with_latency(candidates, latency_rows or (), batch)
        cost, unit, budget = "median_ms", "ms", budget_ms
    front = pareto_front(candidates, cost=cost)
    fitting = [row for row in front if row[cost] <= budget]
    if not fitting:
        raise ValueError(
            f"no {bn_mode!r} instance fits the budget of {budget:g} {unit}; the cheapest "
            f"available costs {front[0][cost]:g} {unit}"
        )
    return dict(min(fitting, key=lambda row: row["top1_error"]))


def format_results(rows: Sequence[Row]) -> str:
    """``rows`` as a text table: BN mode, point, ratio, GFLOPs, top-1 and top-5 error."""
    lines = [f"{'bn':>8} {'point':>5} {'ratio':>5} {'GFLOPs':>8} {'top-1 err':>9} {'top-5 err':>9}"]
    for row in rows:
        ratio = "-" if row["point"] == 0 else f"{row['ratio']:g}"
        lines.append(
            f"{row['bn_mode']:>8} {row['point']:>5} {ratio:>5} {row['gflops']:>8.4f} "
            f"{row['top1_error']:>9.2f} {row['top5_error']:>9.2f}"
        )
    return "\n".join(lines)


def select_run(
    workdir: str | Path,
    *,
    budget_gflops: float | None,
    budget_ms: float | None,
    latency_file: str | Path | None,
    batch: int | None,
) -> Row:
    """Prints and returns the best measured instance within the budget."""
    rows = read_results(workdir)
    latency_rows = None
    if budget_ms is not None:
        path = Path(latency_file) if latency_file else RunDir(workdir).latency_json
        if not path.is_file():
            raise FileNotFoundError(
                f"--budget-ms needs a latency table, and {path} does not exist: measure one "
                f"with `python -m sdpoint_jax.bench latency --model M --out {Path(workdir)}`, "
                f"or give one with --latency"
            )
        latency_rows = json.loads(path.read_text())
    bn_mode = "instance" if any(r["bn_mode"] == "instance" for r in rows) else "uniform"
    row = select_instance(
        rows,
        budget_gflops=budget_gflops,
        budget_ms=budget_ms,
        latency_rows=latency_rows,
        batch=batch,
        bn_mode=bn_mode,
    )
    print(format_results([row]))
    return row
