"""Training and evaluation of every method of the comparison.

Every method is trained by the project's one training loop
(:func:`sdpoint_jax.training.loop.fit`): the same data stream, optimizer, learning-rate
schedule, number of steps and seed; only :class:`~sdpoint_jax.compare.method.Method`
differs.
Train steps lower their convolutions by the config's ``conv_lowering``
(:func:`sdpoint_jax.xla_cpu.conv_lowering.with_conv_lowering`); evaluation programs
run XLA's.
Each method's variables are checkpointed in ``OUT/<method>/checkpoints`` (atomically,
every ``checkpoint_every_steps`` and at the end), and a rerun resumes or, when the
method finished, skips straight to evaluation: nothing trained is lost. ``SIGTERM``
saves the running method's checkpoint and raises :class:`Preempted`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sdpoint_jax.compare.method import Method, Setting, Variables
from sdpoint_jax.compare.two_phase import FineTuneMethod, check_architecture, phase_two_config
from sdpoint_jax.config import config_from_saved
from sdpoint_jax.data import pipeline
from sdpoint_jax.evaluation.budget import budgeted_eval, fit_thresholds
from sdpoint_jax.training import parallel
from sdpoint_jax.training.checkpoint import CheckpointManager
from sdpoint_jax.training.loop import Monitor, fit
from sdpoint_jax.training.run import Run, TrainState
from sdpoint_jax.training.run_dir import RunDir

Row = dict[str, Any]


class Preempted(Exception):
    """``SIGTERM`` arrived during training; the method's checkpoint has been saved."""


def train_method(
    method: Method,
    config: ml_collections.ConfigDict,
    directory: Path,
    mesh: Mesh,
) -> Variables:
    """Trains ``method`` with the project's training loop
    (:func:`sdpoint_jax.training.loop.fit`) for ``config.optim.num_epochs`` (or
    ``config.run.max_steps``) and returns its variables, resuming from
    ``directory/checkpoints`` when a checkpoint exists.

    A two-phase method (:class:`~sdpoint_jax.compare.two_phase.FineTuneMethod`) first
    trains (or resumes, or just reads) its phase I in ``directory.parent /
    <phase I's name>``, refusing a checkpoint there of another architecture, then
    trains phase II in ``directory`` on the ``finetune`` schedule.

    With ``config.compare.monitor`` the loop logs :func:`test_error_monitor` every
    ``config.run.eval_every_epochs`` and at the end (``eval_top1_error`` rows of
    ``train_log.jsonl``, with ``train_seconds``).

    Raises:
      Preempted: on ``SIGTERM``, after saving the current step.
      CheckpointError: phase I's checkpoint is of another architecture or config.
    """
    if isinstance(method, FineTuneMethod):
        first = RunDir(directory.parent / method.phase_one.name)
        if first.training_step() is not None:
            with CheckpointManager(first.checkpoints) as manager:
                saved = config_from_saved(manager.saved_config())
            check_architecture(method.phase_one, saved, config)
        method.start_from(train_method(method.phase_one, config, first.path, mesh))
        config = phase_two_config(config)
    run = Run.for_trainee(method, config, directory, mesh)
    monitor = test_error_monitor(method, config, mesh) if config.compare.monitor else None
    state, stopped = fit(run, resume=True, evaluate=False, keep_last=1, monitor=monitor)
    if stopped:
        raise Preempted(f"SIGTERM: saved {method.name} at step {int(state.step)} in {directory}")
    return state.variables


MONITOR_METRIC = "eval_top1_error"


def test_error_monitor(method: Method, config: ml_collections.ConfigDict, mesh: Mesh) -> Monitor:
    """Learning curves: a training-loop monitor giving the top-1 error (%) of ``method``'s
    full setting (:meth:`Method.full_setting`) on ``config.data.eval_split``, as
    ``{MONITOR_METRIC: error}``; the same number :func:`evaluate_method` reports for
    that setting."""
    setting = method.full_setting(pipeline.dataset_spec(config.data.dataset).image_size)
    predict = _predictor(method, [setting])

    def monitor(state: TrainState) -> dict[str, float]:
        (predicted,), labels = _outputs(
            predict, state.variables, config, mesh, config.data.eval_split, f"monitor {method.name}"
        )
        return {MONITOR_METRIC: _top1_error(predicted, labels)}

    return monitor


def _predictor(
    method: Method, settings: Sequence[Setting]
) -> Callable[[Variables, jax.Array], tuple[jax.Array, ...]]:
    """``fn(variables, images)``: the predicted classes ``(B, 1)`` of ``method`` under each
    of ``settings`` (a compiled program per setting)."""

    @functools.partial(jax.jit, static_argnames="setting")
    def predict(variables: Variables, images: jax.Array, setting: Setting) -> jax.Array:
        return jnp.argmax(method.logits(variables, images, setting), -1)[:, None]

    return lambda variables, images: tuple(
        predict(variables, images, setting=setting) for setting in settings
    )


def _top1_error(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 error (%) of predicted classes ``(N, 1)`` against ``labels`` ``(N,)``."""
    return 100.0 * float(np.mean(predicted[:, 0] != labels))


def _outputs(
    fn: Any,
    variables: Variables,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    split: str | None,
    desc: str,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Runs ``fn(variables, images) -> tuple of arrays (..., B, ...)`` over ``split`` and
    returns, per output, the real examples' values concatenated on the batch axis
    (axis ``-2``), and the labels ``(N,)``."""
    outputs: list[list[np.ndarray]] = []
    labels = []
    batches = pipeline.eval_batches(
        config.data.dataset,
        global_batch_size=config.data.eval_batch_size,
        split=split,
        data_dir=config.data.data_dir,
    )
    for batch in tqdm(batches, desc=desc, unit="batch"):
        real = batch["mask"] > 0
        placed = parallel.shard_batch({"image": batch["image"]}, mesh)["image"]
        values = fn(variables, placed)
        if not outputs:
            outputs = [[] for _ in values]
        for store, value in zip(outputs, values, strict=True):
            store.append(np.asarray(value)[..., real, :])
        labels.append(batch["label"][real])
    return [np.concatenate(store, axis=-2) for store in outputs], np.concatenate(labels)


def _error(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(np.argmax(probabilities, -1) != labels))


def evaluate_method(
    method: Method,
    variables: Variables,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> list[Row]:
    """Top-1 error (%) and GFLOPs per image of ``method`` on the evaluation split.

    Rows (``kind``): one per eval setting (``"setting"``); with
    ``config.compare.stochastic_passes > 0`` and a method that has stochastic inference, one
    ``"stochastic"`` row (mean softmax over that many random passes; GFLOPs = the
    passes' total); for a method with exits and a ``config.data.holdout_split``, one
    ``"budgeted"`` row per target of ``config.cascade.budget_points`` evenly spaced average
    costs (confidence thresholds fit on the held-out split, applied to the eval split).
    """
    spec = pipeline.dataset_spec(config.data.dataset)
    settings = list(method.eval_settings())
    placed = parallel.replicate(variables, mesh)

    predictions, labels = _outputs(
        _predictor(method, settings),
        placed,
        config,
        mesh,
        config.data.eval_split,
        f"evaluate {method.name}",
    )
    rows = [
        {
            "method": method.name,
            "curve": method.curve(setting),
            "kind": "setting",
            "setting": method.describe(setting),
            "gflops": method.gflops(setting, spec.image_size),
            "top1_error": _top1_error(predicted, labels),
            "examples": len(labels),
        }
        for setting, predicted in zip(settings, predictions, strict=True)
    ]
    if config.compare.stochastic_passes > 0 and method.has_stochastic_inference():
        passes = config.compare.stochastic_passes
        key = jax.random.key(config.seed)
        (probabilities,), labels = _outputs(
            lambda v, images: (method.stochastic_probabilities(v, images, key, passes),),
            placed,
            config,
            mesh,
            config.data.eval_split,
            f"stochastic inference {method.name}",
        )
        mean_gflops = np.mean([row["gflops"] for row in rows])
        rows.append(
            {
                "method": method.name,
                "curve": f"{method.name}-stochastic",
                "kind": "stochastic",
                "setting": f"{passes} passes",
                "gflops": float(passes * mean_gflops),
                "top1_error": _error(probabilities, labels),
                "examples": len(labels),
            }
        )
    if config.data.holdout_split and method.has_exits():
        rows += _budgeted_rows(method, placed, config, mesh)
    return rows


def _budgeted_rows(
    method: Method, variables: Variables, config: ml_collections.ConfigDict, mesh: Mesh
) -> list[Row]:
    """Budgeted inference (MSDNet/IMTA): thresholds fit on ``config.data.holdout_split`` for
    each target average cost, error and average cost measured on the eval split."""
    exit_gflops = method.exit_gflops(pipeline.dataset_spec(config.data.dataset).image_size)
    fn = jax.jit(lambda v, images: (method.exit_probabilities(v, images),))
    (fit_probs,), _ = _outputs(
        fn, variables, config, mesh, config.data.holdout_split, f"fit thresholds {method.name}"
    )
    (test_probs,), labels = _outputs(
        fn, variables, config, mesh, config.data.eval_split, f"budgeted {method.name}"
    )
    rows = []
    for target in np.linspace(exit_gflops[0], exit_gflops[-1], config.cascade.budget_points + 2)[
        1:-1
    ]:
        thresholds = fit_thresholds(fit_probs, exit_gflops, float(target))
        gflops, error = budgeted_eval(test_probs, labels, thresholds, exit_gflops)
        rows.append(
            {
                "method": method.name,
                "curve": f"{method.name}-budgeted",
                "kind": "budgeted",
                "setting": f"target {target:.4f}",
                "gflops": float(gflops),
                "top1_error": float(error),
                "examples": len(labels),
            }
        )
    return rows
