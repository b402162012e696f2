"""The training loop (:func:`fit`), data-parallel and resumable, and SDPoint training
(Algorithm 1 of the paper) with it (:func:`train`). The comparison's methods are
trained by the same loop (:mod:`sdpoint_jax.compare.trainer`).

Every step draws one instance ``(p, r)`` on the host from a generator seeded by
``(seed, step)`` (so a resumed run draws the same sequence) and runs the train step
compiled for that instance. ``config.sdpoint.enabled = False`` trains the plain network with
the same code (every step is the full instance).

Low mode (:mod:`sdpoint_jax.core.lowmode`, paper 003; off by default): with
``config.low_mode.prob > 0`` (or per-epoch ``config.low_mode.epoch_probs``) each step
first draws, from its own generator seeded by ``(seed, step)``, whether it runs in
low mode. A low-mode step runs the *full* network in low mode (inputs and eligible
kernels downsampled by ``config.low_mode.ratio``); any other step draws an SDPoint
instance exactly as without low mode. So a step is low-mode, an SDPoint instance, or
full, and the instances of the other steps are those of the same run without low
mode. Full mode is forced for ``config.low_mode.full_epochs_after_drop`` epochs after
each learning-rate drop. Low-mode steps do not update running batch-norm statistics;
evaluation runs in full mode.

Optimisation follows the papers: SGD with Nesterov momentum 0.9 and L2 weight decay
on every parameter (added to the gradient, as PyTorch's ``weight_decay``), and a
step learning-rate schedule (``lr_drop_epochs``, each a ``lr_decay`` factor).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import tensorflow as tf  # TensorBoard summaries; already loaded by the input pipeline
from tqdm.auto import tqdm

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data import pipeline
from sdpoint_jax.evaluation.evaluate import evaluate_instances
from sdpoint_jax.training import parallel
from sdpoint_jax.training.checkpoint import CheckpointError, PreemptionFlag
from sdpoint_jax.training.run import Run, TrainState
from sdpoint_jax.training.run_dir import RunDir
from sdpoint_jax.training.schedules import ProgramKey, learning_rate_schedule
from sdpoint_jax.training.steps import program_fingerprint, train_programs

Monitor = Callable[[TrainState], dict[str, float]]
"""Metrics of a training state (e.g. a test error), logged at the evaluation times."""


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    resume: bool,
    resume_step: int | None = None,
) -> TrainState:
    """Trains ``config`` with SDPoint in ``workdir`` (checkpoints in
    ``workdir/checkpoints``), evaluating the full network every
    ``config.run.eval_every_epochs`` and keeping the best checkpoint too.

    With ``resume`` the newest intact checkpoint is restored (a damaged newer one is
    moved aside, with a warning) and training continues exactly as an uninterrupted run
    would; ``resume_step`` restores that step instead (newer steps are moved aside).
    Without either, an existing checkpoint is an error (nothing trained is ever
    overwritten). SIGTERM saves a checkpoint and returns.
    """
    run = Run.create(config, workdir)
    state, _ = fit(run, resume=resume, evaluate=True, resume_step=resume_step)
    return state


def fit(
    run: Run,
    *,
    resume: bool,
    evaluate: bool,
    keep_last: int | None = None,
    resume_step: int | None = None,
    monitor: Monitor | None = None,
) -> tuple[TrainState, bool]:
    """Trains ``run.trainee`` for ``config.optim.num_epochs`` (or up to ``config.run.max_steps``):
    the one training loop of the project, for SDPoint and for every method of the
    comparison. Returns the final state and whether SIGTERM stopped it (after saving).

    Every step runs the program of ``trainee.train_setting(seed, step)`` on the batch
    of that step; checkpoints (and the draws per setting) are saved atomically every
    ``config.run.checkpoint_every_steps`` steps, at the end and on SIGTERM. With
    ``evaluate``, the full network's top-1 accuracy is measured every
    ``config.run.eval_every_epochs`` (the best checkpoint is kept too). ``monitor``, if
    given, is called with the state at the same times (with or without ``evaluate``)
    and its metrics are logged with ``train_seconds``; it must not change the state.
    ``resume``: see
    :func:`train`; ``resume_step`` implies ``resume``. ``keep_last``: checkpoints kept
    (default ``config.run.keep_checkpoints``).
    """
    config = run.config
    run.workdir.mkdir(parents=True, exist_ok=True)
    state, draws = _start_state(run, resume or resume_step is not None, resume_step)
    start = int(state.step)
    end = (
        run.total_steps
        if config.run.max_steps is None
        else min(config.run.max_steps, run.total_steps)
    )
    programs = train_programs(
        run.trainee,
        run.tx,
        state,
        run.mesh,
        config.optim.batch_size,
        run.image_size,
        program_fingerprint(config, run.trainee, run.steps_per_epoch),
        conv_lowering=config.compile.conv_lowering,
        seed=config.seed,
        cpu_optimization_level=config.compile.cpu_optimization_level,
    )
    logger = _MetricsLogger(run.run_dir, jax.process_index() == 0)
    if config.compile.precompile:
        compile_start = time.perf_counter()
        programs.precompile(run.program_keys, workers=config.compile.workers)
        logger.write(start, {"compile_seconds": time.perf_counter() - compile_start}, None)
    eval_every = max(1, round(config.run.eval_every_epochs * run.steps_per_epoch))
    batches = pipeline.train_batches(
        config.data.dataset,
        global_batch_size=config.optim.batch_size,
        seed=config.seed,
        start_step=start,
        data_dir=config.data.data_dir,
        train_split=config.data.train_split,
        examples_per_class=config.data.train_examples_per_class,
        augment=config.data.augment,
    )
    draws = Counter(draws)
    stopped = False
    with (
        run.checkpoints(
            keep_last=config.run.keep_checkpoints if keep_last is None else keep_last,
            keep_best=1 if evaluate else 0,
            best_metric="top1_accuracy" if evaluate else None,
        ) as manager,
        PreemptionFlag() as preempted,
        # closed at once: an abandoned tf.data iterator costs seconds when collected
        contextlib.closing(batches),
    ):
        save = functools.partial(_save, manager, config)
        bar = tqdm(
            total=end,
            initial=start,
            desc=f"train {run.trainee.name}",
            unit="step",
            disable=not logger.main,
        )
        schedule = learning_rate_schedule(config, run.steps_per_epoch)
        last_log = (start, time.perf_counter())
        clock = _TrainClock()
        for step, batch in zip(
            range(start, end), parallel.shard_batches(batches, run.mesh), strict=False
        ):
            key = run.trainee.train_setting(config.seed, step)
            draws[str(key)] += 1
            state, metrics = programs[key](state, batch)
            if (step + 1) % config.run.log_every_steps == 0 or step + 1 == end:
                metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
                now = time.perf_counter()
                images_per_sec = (
                    (step + 1 - last_log[0]) * config.optim.batch_size / (now - last_log[1])
                )
                last_log = (step + 1, now)
                logger.write(
                    step + 1,
                    {
                        **metrics,
                        "learning_rate": float(schedule(step)),
                        "images_per_sec": images_per_sec,
                        "train_seconds": clock.seconds(),
                    },
                    key,
                )
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    img_s=f"{images_per_sec:.0f}",
                    instance=str(key),
                )
            bar.update()
            measures = (step + 1) % eval_every == 0 or step + 1 == run.total_steps
            measured_now = measures and (evaluate or monitor is not None)
            if measured_now:
                with clock.paused(state):
                    measured = (
                        {"eval_top1_accuracy": _full_accuracy(run, state)} if evaluate else {}
                    )
                    measured.update(monitor(state) if monitor is not None else {})
                    logger.write(step + 1, {**measured, "train_seconds": clock.seconds()}, None)
            # at most one save per step: a step is never written twice
            if evaluate and measures:
                with clock.paused(state):
                    save(step + 1, state, draws, {"top1_accuracy": measured["eval_top1_accuracy"]})
            elif (
                (step + 1) % config.run.checkpoint_every_steps == 0
                or step + 1 == end
                or preempted()
            ):
                with clock.paused(state):
                    save(step + 1, state, draws, None)
            if measured_now:
                last_log = (step + 1, time.perf_counter())  # exclude eval from img/s
            if preempted():
                logger.note(f"SIGTERM: saved step {step + 1} and stopped")
                stopped = True
                break
        bar.close()
    logger.write_draws(int(state.step), dict(sorted(draws.items())))
    logger.close()
    return state, stopped


def _start_state(
    run: Run, resume: bool, resume_step: int | None
) -> tuple[TrainState, dict[str, int]]:
    with run.checkpoints() as manager:
        steps = manager.all_steps()
        if resume_step is not None:
            if resume_step not in steps:
                raise CheckpointError(
                    f"no checkpoint for --resume-step={resume_step} in "
                    f"{run.run_dir.checkpoints}; available steps: {steps}"
                )
            for step in steps[steps.index(resume_step) + 1 :]:
                moved = manager.move_aside(step, "superseded")
                if jax.process_index() == 0:
                    print(f"--resume-step={resume_step}: moved step {step} aside to {moved}")
    if not steps:
        if resume:
            print(f"no checkpoint in {run.run_dir.checkpoints} yet: starting fresh")
        return run.initial_state(), run.initial_draws()
    if not resume:
        raise CheckpointError(
            f"{run.run_dir.checkpoints} already holds a checkpoint (step {steps[-1]}); "
            f"pass --resume to continue it, or choose a new --workdir"
        )
    state, draws = run.restore(step=resume_step, fall_back=True)
    if jax.process_index() == 0:
        print(f"resuming from checkpoint step {int(state.step)} in {run.run_dir.checkpoints}")
    return state, draws


def _save(manager, config, step, state, draws, metrics) -> None:
    checkpoint = {"state": state, "draws": {k: int(v) for k, v in draws.items()}}
    manager.save(step, checkpoint, config=config.to_dict(), metrics=metrics, force=True)


def _full_accuracy(run: Run, state: TrainState) -> float:
    """Top-1 accuracy (%) of the full instance on the eval split (instance BN)."""
    batches = pipeline.eval_batches(
        run.config.data.dataset,
        global_batch_size=run.config.data.eval_batch_size,
        split=run.config.data.eval_split,
        data_dir=run.config.data.data_dir,
    )
    (row,) = evaluate_instances(
        run.model,
        state.variables,
        batches,
        [Instance.full()],
        input_hw=(run.image_size, run.image_size),
        bn_modes=("instance",),
        mesh=run.mesh,
    )
    return 100.0 - row["top1_error"]


class _TrainClock:
    """Wall-clock seconds spent in training steps by this invocation (a resumed run
    starts again from 0): evaluation and checkpoint saves are paused out, and the
    clock waits for the device before it pauses, so no step's time is missed."""

    def __init__(self):
        self._start = time.perf_counter()
        self._paused_total = 0.0
        self._paused_at: float | None = None

    def seconds(self) -> float:
        """Training seconds so far (frozen while paused)."""
        now = time.perf_counter() if self._paused_at is None else self._paused_at
        return now - self._start - self._paused_total

    @contextlib.contextmanager
    def paused(self, state: TrainState) -> Iterator[None]:
        jax.block_until_ready(state)
        self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._paused_total += time.perf_counter() - self._paused_at
            self._paused_at = None


class _MetricsLogger:
    """Metrics to the run's ``train_log.jsonl`` and TensorBoard summaries."""

    def __init__(self, run_dir: RunDir, main: bool):
        self.main = main
        self._jsonl = run_dir.train_log.open("a") if main else None
        self._tb = None
        if main:
            self._tb = tf.summary.create_file_writer(str(run_dir.tensorboard))

    def write(self, step: int, metrics: dict[str, float], key: ProgramKey | None) -> None:
        """One log row; ``key`` (the step's instance or low mode) goes in ``"instance"``."""
        if not self.main:
            return
        row = {"step": step, **metrics}
        if key is not None:
            row["instance"] = str(key)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)

    def write_draws(self, step: int, draws: dict[str, int]) -> None:
        """Steps per instance and low mode so far (a ``"draws"`` log row), and prints them."""
        self.note("draws (instances, low mode): " + json.dumps(draws))
        if self.main:
            self._jsonl.write(json.dumps({"step": step, "draws": draws}) + "\n")
            self._jsonl.flush()

    def note(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    def close(self) -> None:
        if self.main:
            self._jsonl.close()
            self._tb.close()
