"""The report of a comparison over several seeds (``config.compare.seeds``): written by
``python -m sdpoint_jax.compare`` after the runs, into ``WORKDIR/study.json``,
``WORKDIR/study.csv`` and ``WORKDIR/study_curves.png``.

Every table row has ``section``, ``method``, ``quantity``, ``runs`` (the method's runs),
``n`` (the values summarized), ``mean``, ``std`` (sample standard deviation over seeds,
empty for one value), ``ci_low`` / ``ci_high`` (paired rows: two-sided 95 % Student-t
interval of the mean difference) and the per-seed ``seeds`` and ``values``. Sections:

* ``top1_error`` (%, on ``config.data.eval_split``): ``full`` (the setting
  :meth:`~sdpoint_jax.compare.method.Method.full_setting` names: SDPoint's full
  instance, the regularisers' deterministic inference), ``best`` (the lowest error
  of the method's settings, chosen per seed on the test split, as the paper's Table 2
  reports its best instance) and ``stochastic`` (stochastic inference, where the method
  has it). UBN and budgeted curves are left to ``compare.csv``.
* ``paired``: each other method's quantity minus ``baseline``'s ``full`` error at the same
  seed (``method`` is e.g. ``"sdpoint - baseline"``).
* ``train_seconds``: the training loop's clock of each run (steps only; evaluations,
  checkpoints and compilation excluded).
* ``time_to_accuracy``: for ``baseline``, ``low``, ``sdpoint`` and ``sdpoint+low``,
  ``seconds_to_<t>`` and ``steps_to_<t>`` for every target test accuracy ``t`` of
  ``config.time_to_accuracy.accuracy_targets``: the first ``train_seconds`` at which the
  monitored full-network test accuracy reached ``t``
  (:func:`sdpoint_jax.compare.time_to_target.summarize`); ``n`` counts the runs that
  reached it and only those are averaged.

``study.json`` holds the table (``"table"``) and the learning curves (``"curves"``: per
method, the mean over its seeds of the training error per epoch, the mean of
``100 * (1 - accuracy)`` of the epoch's logged training batches, and of the monitored
test error at each evaluation). ``study_curves.png`` plots both against the epoch: the
gap between them is the over-fitting. Low-mode steps' training accuracy is that of
their downsampled batches. Runs need ``config.compare.monitor``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdpoint_jax.compare import time_to_target
from sdpoint_jax.compare.registry import build_method
from sdpoint_jax.compare.statistics import paired_difference, summarize
from sdpoint_jax.compare.trainer import MONITOR_METRIC, Row
from sdpoint_jax.data.specs import SPECS

STUDY_JSON = "study.json"
STUDY_CSV = "study.csv"
STUDY_PNG = "study_curves.png"
BASELINE = "baseline"
RunKey = tuple[str, int]  # (method, seed)


def seed_errors(
    rows: Sequence[Row], full: Mapping[str, str]
) -> dict[tuple[str, str], dict[int, float]]:
    """``{(method, quantity): {seed: top-1 error}}`` for the quantities ``full``, ``best``
    and ``stochastic`` (module docstring) of comparison rows that carry a ``seed``;
    ``full``: each method's full setting as its rows describe it
    (:func:`full_settings`)."""
    errors: dict[tuple[str, str], dict[int, float]] = {}
    runs = dict.fromkeys((row["method"], row["seed"]) for row in rows)
    for method, seed in runs:
        mine = [row for row in rows if (row["method"], row["seed"]) == (method, seed)]
        settings = [row for row in mine if row["kind"] == "setting" and row["curve"] == method]
        if settings:
            at_full = next(row for row in settings if row["setting"] == full[method])
            errors.setdefault((method, "full"), {})[seed] = at_full["top1_error"]
            best = min(row["top1_error"] for row in settings)
            errors.setdefault((method, "best"), {})[seed] = best
        for row in mine:
            if row["kind"] == "stochastic":
                errors.setdefault((method, "stochastic"), {})[seed] = row["top1_error"]
    return errors


def _row(section: str, method: str, quantity: str, runs: int, values: Mapping[int, float]):
    seeds = sorted(values)
    return {
        "section": section,
        "method": method,
        "quantity": quantity,
        "runs": runs,
        **summarize([values[seed] for seed in seeds]),
        "ci_low": None,
        "ci_high": None,
        "seeds": seeds,
        "values": [values[seed] for seed in seeds],
    }


def _evaluated_rows(log: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Log rows with the monitor's test error also as ``eval_top1_accuracy`` (what
    :func:`time_to_target.summarize` reads)."""
    return [
        {**row, "eval_top1_accuracy": 100.0 - row[MONITOR_METRIC]} if MONITOR_METRIC in row else row
        for row in log
    ]


def full_settings(config: ml_collections.ConfigDict, methods: Iterable[str]) -> dict[str, str]:
    """``{method: description}`` of each method's
    :meth:`~sdpoint_jax.compare.method.Method.full_setting` under ``config``."""
    image_size = SPECS[config.data.dataset].image_size
    built = {name: build_method(name, config) for name in methods}
    return {name: m.describe(m.full_setting(image_size)) for name, m in built.items()}


def study_table(
    rows: Sequence[Row],
    logs: Mapping[RunKey, Sequence[Mapping[str, Any]]],
    full: Mapping[str, str],
    targets: Sequence[float] = (),
) -> list[dict[str, Any]]:
    """The study's table (module docstring) from the comparison rows (with ``seed``),
    each run's ``train_log.jsonl`` rows and each method's full setting (``full``,
    :func:`full_settings`).

    Raises:
      ValueError: a run's log has no monitored test error.
    """
    runs: dict[str, int] = {}
    for method, _ in logs:
        runs[method] = runs.get(method, 0) + 1
    errors = seed_errors(rows, full)
    table = [
        _row("top1_error", method, quantity, runs.get(method, len(values)), values)
        for (method, quantity), values in errors.items()
    ]
    control = errors.get((BASELINE, "full"))
    if control:
        for (method, quantity), values in errors.items():
            if method == BASELINE or not set(values) & set(control):
                continue
            paired = paired_difference(values, control)
            table.append(
                {
                    **_row(
                        "paired",
                        f"{method} - {BASELINE}",
                        quantity,
                        runs.get(method, 0),
                        {seed: values[seed] - control[seed] for seed in paired["seeds"]},
                    ),
                    "ci_low": paired["ci_low"],
                    "ci_high": paired["ci_high"],
                }
            )
    summaries: dict[RunKey, dict[str, Any]] = {}
    for (method, seed), log in logs.items():
        try:
            summaries[method, seed] = time_to_target.summarize(_evaluated_rows(log), targets)
        except ValueError:
            raise ValueError(
                f"the log of {method} (seed {seed}) holds no monitored test error: "
                f"run the comparison with config.compare.monitor = True"
            ) from None
    for method in runs:
        mine = {seed: s for (m, seed), s in summaries.items() if m == method}
        times = {seed: s["train_seconds"] for seed, s in mine.items()}
        table.append(_row("train_seconds", method, "train", runs[method], times))
        if method not in time_to_target.SETTINGS:
            continue
        for target in targets:
            for unit in ("seconds", "steps"):
                key = f"{unit}_to_{target:g}"
                reached = {seed: s[key] for seed, s in mine.items() if s[key] is not None}
                if reached:
                    table.append(_row("time_to_accuracy", method, key, runs[method], reached))
                else:
                    table.append(
                        {
                            "section": "time_to_accuracy",
                            "method": method,
                            "quantity": key,
                            "runs": runs[method],
                            "n": 0,
                        }
                    )
    return table


def _by_step(log: Sequence[Mapping[str, Any]], metric: str) -> dict[int, float]:
    """``{step: value}`` of ``metric`` (a resumed run's repeated steps: the last)."""
    return {row["step"]: row[metric] for row in log if metric in row}


def learning_curves(
    logs: Mapping[RunKey, Sequence[Mapping[str, Any]]], steps_per_epoch: int
) -> dict[str, dict[str, list[float]]]:
    """Per method, the mean over its seeds of: the training error (%) of each epoch
    (``train_epochs`` 1, 2, ...: the mean of ``100 * (1 - accuracy)`` over the logged
    training batches of that epoch, complete epochs only) and the monitored test error
    (%) at each evaluation (``test_epochs``: step / steps per epoch), on the epochs and
    steps every seed has."""
    curves = {}
    for method in dict.fromkeys(method for method, _ in logs):
        train_runs, test_runs = [], []
        for (m, _), log in logs.items():
            if m != method:
                continue
            accuracy = _by_step(log, "accuracy")
            epochs: dict[int, list[float]] = {}
            for step, value in accuracy.items():
                epochs.setdefault((step - 1) // steps_per_epoch + 1, []).append(
                    100.0 * (1.0 - value)
                )
            train_runs.append(
                {e: float(np.mean(v)) for e, v in epochs.items() if len(v) == steps_per_epoch}
            )
            test_runs.append(_by_step(log, MONITOR_METRIC))
        train_epochs = sorted(set.intersection(*(set(run) for run in train_runs)))
        test_steps = sorted(set.intersection(*(set(run) for run in test_runs)))
        curves[method] = {
            "train_epochs": [float(e) for e in train_epochs],
            "train_error": [float(np.mean([run[e] for run in train_runs])) for e in train_epochs],
            "test_epochs": [step / steps_per_epoch for step in test_steps],
            "test_error": [float(np.mean([run[s] for run in test_runs])) for s in test_steps],
        }
    return curves


def plot_curves(curves: Mapping[str, Mapping[str, list[float]]], path: Path, title: str) -> None:
    """Training (dashed) and test (solid) error against the epoch, a colour per method."""
    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (method, curve) in enumerate(curves.items()):
        for split, style in (("test", {"marker": "o"}), ("train", {"linestyle": "--"})):
            axes.plot(
                curve[f"{split}_epochs"],
                curve[f"{split}_error"],
                color=f"C{index % 10}",
                label=f"{method} {split}",
                **style,
            )
    axes.set_xlabel("epoch")
    axes.set_ylabel("top-1 error (%), mean over seeds")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: " ".join(f"{v:g}" for v in value) if isinstance(value, list) else value
        for key, value in row.items()
    }


def write_study(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    rows: Sequence[Row],
    run_directories: Mapping[RunKey, Path],
) -> list[dict[str, Any]]:
    """Writes ``study.json``, ``study.csv`` and ``study_curves.png`` in ``workdir`` from
    the comparison ``rows`` and the ``train_log.jsonl`` of each run's directory; returns
    the table."""
    from sdpoint_jax.evaluation.evaluate import write_csv
    from sdpoint_jax.training.run import steps_per_epoch

    workdir = Path(workdir)
    logs = {
        key: [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]
        for key, directory in run_directories.items()
    }
    targets = ()
    if "time_to_accuracy" in config:
        targets = tuple(float(t) for t in config.time_to_accuracy.accuracy_targets)
    full = full_settings(config, dict.fromkeys(method for method, _ in run_directories))
    table = study_table(rows, logs, full, targets)
    curves = learning_curves(logs, steps_per_epoch(config))
    (workdir / STUDY_JSON).write_text(
        json.dumps({"table": table, "curves": curves}, indent=1) + "\n"
    )
    write_csv([_csv_row(row) for row in table], workdir / STUDY_CSV)
    plot_curves(curves, workdir / STUDY_PNG, f"{config.model.name} on {config.data.dataset}")
    return table
