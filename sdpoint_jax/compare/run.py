"""Runs a whole comparison: train and evaluate each method, then write the report."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
from tqdm.auto import tqdm

from sdpoint_jax.compare.registry import build_method
from sdpoint_jax.compare.report import COMPARE_CSV, COMPARE_PNG, plot_compare
from sdpoint_jax.compare.trainer import Row, evaluate_method, train_method
from sdpoint_jax.evaluation.evaluate import write_csv
from sdpoint_jax.training import parallel


def run_comparison(config: ml_collections.ConfigDict, workdir: str | Path) -> list[Row]:
    """Trains and evaluates every method of ``config.compare.methods`` in ``workdir``.

    Every method is built (and its name checked) before anything is trained. Rows of
    each method are also kept in ``workdir/<method>/rows.json``, so a rerun after an
    interruption neither retrains nor re-evaluates finished methods.
    """
    workdir = Path(workdir)
    methods = [build_method(name, config) for name in config.compare.methods]
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.optim.batch_size, mesh)
    rows: list[Row] = []
    for method in methods:
        directory = workdir / method.name
        done = directory / "rows.json"
        if done.is_file():
            tqdm.write(f"{method.name}: already evaluated ({done})")
            rows += json.loads(done.read_text())
            continue
        variables = train_method(method, config, directory, mesh)
        method_rows = evaluate_method(method, variables, config, mesh)
        done.write_text(json.dumps(method_rows, indent=1) + "\n")
        rows += method_rows
    write_csv(rows, workdir / COMPARE_CSV)
    plot_compare(rows, workdir / COMPARE_PNG, title=f"{config.model.name} on {config.data.dataset}")
    for row in rows:
        tqdm.write(
            f"{row['curve']:>22} {row['setting']:>14} {row['gflops']:8.4f} GFLOPs "
            f"{row['top1_error']:6.2f}% error"
        )
    return rows
