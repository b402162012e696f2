"""The steps after training: calibrate BN per instance, evaluate every instance.

Each step reads and writes the run directory
(:class:`sdpoint_jax.training.run_dir.RunDir`): ``calibrate`` writes ``calibrated/``,
``evaluate`` writes ``results.{csv,json}`` and ``cost_error.png`` (and
``cascade.{csv,json}`` with ``--cascade``). The last step, choosing an instance for a
budget from ``results.json``, is :func:`sdpoint_jax.evaluation.selection.select_run`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
from jax.experimental import multihost_utils

from sdpoint_jax.data import pipeline
from sdpoint_jax.evaluation.calibrate import calibrate
from sdpoint_jax.evaluation.cascade import evaluate_cascade, format_cascade
from sdpoint_jax.evaluation.evaluate import evaluate_instances, write_csv, write_results
from sdpoint_jax.evaluation.plot import plot_cost_error
from sdpoint_jax.evaluation.selection import format_results
from sdpoint_jax.training.run import Run, TrainState, restore_for_evaluation
from sdpoint_jax.training.run_dir import Source, write_rows_json


def calibrate_run(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Recomputes every instance's BN statistics over ``config.sdpoint.calibration_batches``
    fixed training batches (training augmentation with fixed seeds unless
    ``config.sdpoint.calibration_augment`` is off) and saves them in ``calibrated/``."""
    run = Run.create(config, workdir)
    state, draws = run.restore()
    step = int(state.step)
    batches = pipeline.calibration_batches(
        config.data.dataset,
        global_batch_size=config.optim.batch_size,
        num_batches=config.sdpoint.calibration_batches,
        seed=config.seed,
        data_dir=config.data.data_dir,
        augment=config.sdpoint.calibration_augment,
        train_split=config.data.train_split,
    )
    print(
        f"calibrating {len(run.model.space)} instances of step {step} on "
        f"{config.sdpoint.calibration_batches} x {config.optim.batch_size} training images"
        + (" (training augmentation)" if config.sdpoint.calibration_augment else "")
    )
    variables = calibrate(run.model, state.variables, batches, list(run.model.space), mesh=run.mesh)
    calibrated = state.replace(batch_stats=variables["batch_stats"])
    directory = run.run_dir.calibrated
    if run.run_dir.calibrated_step() == step:  # derived data: replace this step's calibration
        if jax.process_index() == 0:
            shutil.rmtree(directory / str(step))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("replace calibrated statistics")
    with run.checkpoints(directory, keep_last=1) as manager:
        manager.save(
            step, {"state": calibrated, "draws": draws}, config=config.to_dict(), force=True
        )
    print(f"saved calibrated statistics to {directory}")
    return calibrated


def cascade_holdout(config: ml_collections.ConfigDict) -> str:
    """``config.data.holdout_split``, the held-out training images a cascade's thresholds are
    fit on; prints a warning when ``config.data.train_split`` is unset (training then used
    every training image, the held-out ones included).

    Raises:
      ValueError: ``config.data.holdout_split`` is unset.
    """
    if not config.data.holdout_split:
        raise ValueError(
            "--cascade fits its thresholds on held-out training images, but "
            "config.data.holdout_split is not set; train with e.g. "
            "--config.data.train_split=train[:45000] --config.data.holdout_split=train[45000:] "
            "and evaluate with the same config"
        )
    if config.data.train_split is None:
        print(
            f"warning: config.data.train_split is not set, so the model was trained on every "
            f"training image, {config.data.holdout_split!r} included: the cascade's thresholds "
            f"are fit on images it has seen"
        )
    return config.data.holdout_split


def evaluate_run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    instances: str = "all",
    cascade: bool = False,
    cascade_cost: str = "prefix",
) -> list[dict]:
    """Top-1/top-5 error of every instance with instance BN and UBN; writes
    ``results.csv``, ``results.json`` and ``cost_error.png``.

    With ``cascade``, also a confidence cascade across the chosen instances
    (:mod:`sdpoint_jax.evaluation.cascade`) with the model's own statistics (per-instance BN for
    an SDPoint run): stages and thresholds fit on ``config.data.holdout_split`` for
    ``config.cascade.budget_points`` target average costs, measured on ``config.data.eval_split``;
    writes ``cascade.csv`` and ``cascade.json`` and adds its curve to
    ``cost_error.png``. ``cascade_cost``: the cascade's cost accounting
    (:data:`sdpoint_jax.evaluation.cascade.ACCOUNTINGS`). Returns the instance rows either way.
    """
    holdout = cascade_holdout(config) if cascade else None
    run, state, source = restore_for_evaluation(config, workdir)
    chosen = run.model.space.parse_list(instances)
    bn_modes = ("instance", "uniform") if config.sdpoint.bn_mode == "instance" else ("uniform",)
    print(
        f"evaluating {len(chosen)} instances x {bn_modes} at step {source.step}, "
        f"{source.describe()}"
    )

    def batches(split: str | None) -> Iterator[dict]:
        return pipeline.eval_batches(
            config.data.dataset,
            global_batch_size=config.data.eval_batch_size,
            split=split,
            data_dir=config.data.data_dir,
        )

    input_hw = (run.image_size, run.image_size)
    rows = evaluate_instances(
        run.model,
        state.variables,
        batches(config.data.eval_split),
        chosen,
        input_hw=input_hw,
        bn_modes=bn_modes,
        mesh=run.mesh,
        progress=True,
    )
    cascade_rows = None
    if cascade:
        print(
            f"cascade: thresholds fit on {holdout!r}, {config.cascade.budget_points} target costs"
        )
        cascade_rows = evaluate_cascade(
            run.model,
            state.variables,
            batches(holdout),
            batches(config.data.eval_split),
            chosen,
            input_hw=input_hw,
            budget_points=config.cascade.budget_points,
            single_rows=rows,
            accounting=cascade_cost,
            mesh=run.mesh,
            progress=True,
        )
    if jax.process_index() == 0:  # every process holds the same rows: one writes them
        _write_evaluation(config, run, source, rows, cascade_rows)
    return rows


def _write_evaluation(
    config: ml_collections.ConfigDict,
    run: Run,
    source: Source,
    rows: list[dict],
    cascade_rows: list[dict] | None,
) -> None:
    """Writes and prints the results (and the cascade's, unless ``None``) and the plot."""
    files = run.run_dir
    write_results(rows, run.workdir, source)
    print(format_results(rows))
    written = [files.results_csv, files.results_json, files.cost_error_png]
    curves = {}
    if cascade_rows is not None:
        write_csv(cascade_rows, files.cascade_csv)
        write_rows_json(files.cascade_json, cascade_rows, source)
        print(format_cascade(cascade_rows))
        written += [files.cascade_csv, files.cascade_json]
        stages = cascade_rows[0]["stages"].count(",") + 1
        accounting = cascade_rows[0]["accounting"]
        label = f"confidence cascade ({stages} stages, {run.model.bn_mode} BN, {accounting} cost)"
        curves[label] = [(row["avg_gflops"], row["top1_error"]) for row in cascade_rows]
    title = f"{config.model.name} on {config.data.dataset}" + (
        "" if config.sdpoint.enabled else " (no SDPoint)"
    )
    plot_cost_error(rows, files.cost_error_png, title=title, extra_curves=curves)
    print(f"wrote {', '.join(path.name for path in written)} in {run.workdir}")
