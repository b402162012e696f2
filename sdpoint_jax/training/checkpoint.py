"""Checkpointing for training runs, on top of :class:`orbax.checkpoint.CheckpointManager`.

A checkpoint is one step directory ``<directory>/<step>/`` holding three items:

* ``state``: the training state pytree (params, optimizer state, batch-norm statistics,
  step, host-side counters ...), written with ``StandardSave``;
* ``config``: the run's configuration, a JSON object;
* ``meta``: a small JSON object ``{"step": int, "metrics": {name: float}}``.

Orbax writes every step into ``<step>.orbax-checkpoint-tmp`` and renames it only once all
items are complete, so a write cut short (crash, preemption, ``SIGKILL``) never appears
as a step; leftover temporary directories are deleted when a manager is opened.

A step whose files cannot be read (a truncated data file, a bad disk) is not lost to
resuming: :meth:`CheckpointManager.restore_newest_intact` moves it aside (it is never
deleted) and reads the newest intact step instead.

Retention keeps the ``keep_last`` most recent steps *and* the ``keep_best`` steps with
the best ``best_metric``, however old. Every failure to read a checkpoint surfaces as a
:class:`CheckpointError` that names the directory (and step), not as one of the many
exception types of Orbax and TensorStore. :class:`PreemptionFlag` turns ``SIGTERM`` into a
flag the training loop polls so that it can save and exit cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from sdpoint_jax.errors import CheckpointError

STATE_ITEM = "state"
CONFIG_ITEM = "config"
META_ITEM = "meta"


class CorruptedCheckpointError(CheckpointError):
    """A checkpoint's files cannot be read (truncated, missing or damaged)."""


class _Closing:
    """Context-manager protocol for classes with a ``close()`` method."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CheckpointManager(_Closing):
    """Saves and restores training checkpoints in one directory.

    Saves are asynchronous: :meth:`save` returns once the arrays are copied off the
    accelerator and the files are written in the background. :meth:`wait_until_finished`
    blocks until they are on disk; :meth:`close` (or leaving the ``with`` block) does so
    too and must run before the process exits, or the last step is lost.

    Not thread-safe; one manager per directory per job.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        keep_best: int = 0,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
    ) -> None:
        """Opens (creating it if needed) the checkpoint directory.

        Args:
          directory: root directory; every step becomes a subdirectory named by its step.
          keep_last: number of most recent steps kept (at least 1).
          keep_best: number of best steps kept in addition, ranked by
            ``metrics[best_metric]`` of the :meth:`save` calls. Steps saved without
            metrics only count towards ``keep_last``.
          best_metric: metric name ranking steps; required when ``keep_best > 0``.
          best_mode: ``"max"`` if a larger metric is better, ``"min"`` if smaller is.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        if keep_best > 0 and best_metric is None:
            raise ValueError("keep_best > 0 requires best_metric")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self._directory = Path(directory).absolute()
        self._best_metric = best_metric if keep_best > 0 else None
        self._sign = 1.0 if best_mode == "max" else -1.0
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=self._options(keep_last, keep_best),
            handler_registry=_handler_registry(),
        )

    def _options(self, keep_last: int, keep_best: int) -> ocp.CheckpointManagerOptions:
        """Orbax options: save whenever asked, keep the union of latest and best steps."""
        latest = checkpoint_managers.LatestN(n=keep_last)
        if keep_best == 0:
            return ocp.CheckpointManagerOptions(
                preservation_policy=latest, cleanup_tmp_directories=True
            )
        best = checkpoint_managers.BestN(
            get_metric_fn=self._score, n=keep_best, keep_checkpoints_without_metrics=False
        )
        return ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy([latest, best]),
            # Orbax writes (and re-reads on reopening) a step's metrics only if best_fn is
            # set; ranking itself is done by the BestN policy above.
            best_fn=self._score,
            best_mode="max",
            cleanup_tmp_directories=True,
        )

    def _score(self, metrics: Mapping[str, Any]) -> float:
        """Ranking score of a step's metrics, larger is better.

        A step whose metrics lack ``best_metric`` (saved under another configuration) or
        hold NaN ranks last.
        """
        value = float(metrics.get(self._best_metric, math.nan))
        return -math.inf if math.isnan(value) else self._sign * value

    def save(
        self,
        step: int,
        state: Any,
        *,
        config: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts writing ``state``, ``config`` and ``metrics`` as checkpoint ``step``.

        Args:
          step: training step; names the checkpoint.
          state: pytree of ``jax.Array``, ``np.ndarray`` and Python/NumPy scalar leaves.
          config: JSON-serialisable run configuration, returned by :meth:`restore`.
          metrics: flat ``{name: number}``; stored in the metadata and, when
            ``keep_best > 0``, used for ranking, in which case it must contain
            ``best_metric``.
          force: also save a step that is not newer than the latest saved one (normally
            skipped). An existing step is never overwritten.

        Returns:
          Whether a save was started (``False`` if skipped, see ``force``).

        Raises:
          TypeError: ``config`` or ``metrics`` is not JSON-serialisable.
          ValueError: ``metrics`` lacks ``best_metric``.
          CheckpointError: with ``force``, the step already exists; or the previous
            (background) save failed.
        """
        metrics = _json_metrics(metrics)
        if (
            self._best_metric is not None
            and metrics is not None
            and self._best_metric not in metrics
        ):
            raise ValueError(f"metrics {sorted(metrics)} lack best_metric {self._best_metric!r}")
        _require_json("config", config)
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                CONFIG_ITEM: ocp.args.JsonSave(dict(config)),
                META_ITEM: ocp.args.JsonSave({"step": int(step), "metrics": metrics or {}}),
            }
        )
        self.wait_until_finished()
        try:
            return self._manager.save(step, args=args, metrics=metrics, force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            raise CheckpointError(
                f"checkpoint step {step} already exists in {self._directory}"
            ) from None

    def all_steps(self) -> list[int]:
        """Steps of the retained checkpoints, ascending (see :meth:`latest_step`)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Most recent step, or ``None`` if the directory holds no checkpoint.

        Includes a step whose save is still in progress (:meth:`restore` waits for it);
        never a step that an earlier process left incomplete.
        """
        return self._manager.latest_step()

    def restore(
        self, state_template: Any, step: int | None = None
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Reads checkpoint ``step`` (default: the latest) onto ``state_template``.

        The restored state has the template's pytree structure (flax dataclasses,
        optax states ...), dtypes (saved values are cast) and, for ``jax.Array`` or
        ``jax.ShapeDtypeStruct`` leaves, shardings; ``np.ndarray`` and scalar leaves come
        back as such. Waits for pending saves first.

        Returns:
          ``(state, config, meta)``, ``meta`` being ``{"step": int, "metrics": {...}}``.

        Raises:
          CheckpointError: no checkpoint (or no ``step``) in the directory, the saved
            tree does not match the template's key paths and shapes, or the checkpoint
            cannot be read (corrupted or incomplete files).
        """
        self.wait_until_finished()
        step = self._resolve_step(step)
        with self._reading(step):
            saved = self._manager.metadata(step).item_metadata[STATE_ITEM]
        if saved is None:
            raise self._corrupted(step, "the state's metadata is missing")
        mismatch = _first_mismatch(saved.tree, state_template)
        if mismatch is not None:
            raise CheckpointError(
                f"checkpoint step {step} in {self._directory} does not match the state "
                f"template: {mismatch}"
            )
        with self._reading(step):
            restored = self._manager.restore(step, args=_restore_args(state_template))
        return restored[STATE_ITEM], restored[CONFIG_ITEM], restored[META_ITEM]

    def restore_newest_intact(
        self, state_template: Any
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """:meth:`restore` of the newest step that can be read. Each newer step that
        cannot (:class:`CorruptedCheckpointError`) is moved aside to
        ``<directory>/<step>.corrupted`` (:meth:`move_aside`; never deleted), with a
        warning on stderr that names it and the step read instead.

        Raises:
          CheckpointError: no checkpoint, none intact, or the newest intact one does not
            match ``state_template``.
        """
        self.wait_until_finished()
        damaged: list[tuple[int, CorruptedCheckpointError]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(state_template, step)
            except CorruptedCheckpointError as err:
                damaged.append((step, err))
                continue
            for bad, err in damaged:
                moved = self.move_aside(bad, "corrupted")
                if jax.process_index() == 0:
                    print(
                        f"warning: {err}; moved it to {moved} and read step {step} instead",
                        file=sys.stderr,
                        flush=True,
                    )
            return restored
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self._directory}: steps "
                f"{sorted(step for step, _ in damaged)} are all corrupted or incomplete"
            )
        raise CheckpointError(f"no checkpoint found in {self._directory}")

    def move_aside(self, step: int, label: str) -> Path:
        """Renames checkpoint ``step`` to ``<step>.<label>`` (``<step>.<label>-2`` ...
        where taken), out of the manager's steps; returns the new path. Process 0 of a
        multi-process job renames, the others only wait for it."""
        self.wait_until_finished()
        source = self._directory / str(step)
        target = self._directory / f"{step}.{label}"
        suffix = 2
        while target.exists():
            target = self._directory / f"{step}.{label}-{suffix}"
            suffix += 1
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"move aside checkpoint {step}")
        self._manager.reload()
        return target

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config saved with checkpoint ``step`` (default: the latest), read without
        the state; ``CheckpointError`` as for :meth:`restore`."""
        self.wait_until_finished()
        step = self._resolve_step(step)
        with self._reading(step):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
            )
        return restored[CONFIG_ITEM]

    def _resolve_step(self, step: int | None) -> int:
        """The requested step, or the latest one; raises if it does not exist."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self._directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self._directory}; available: {steps}"
            )
        return step

    @contextlib.contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        """Turns any failure inside the block into a :class:`CheckpointError`.

        Orbax and TensorStore report missing or truncated files with a range of
        exception types (``ValueError``, ``FileNotFoundError``, ``JSONDecodeError``,
        bare ``Exception``); the original stays available as ``__context__``.
        """
        try:
            yield
        except Exception as err:
            lines = str(err).splitlines()
            summary = lines[0][:300] if lines else ""
            raise self._corrupted(step, f"{type(err).__name__}: {summary}") from None

    def _corrupted(self, step: int, reason: str) -> CorruptedCheckpointError:
        """The error for an unreadable checkpoint ``step``."""
        return CorruptedCheckpointError(
            f"checkpoint step {step} in {self._directory} is corrupted or incomplete ({reason})"
        )

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk and old steps are deleted.

        Raises:
          CheckpointError: a background save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise CheckpointError(
                f"saving a checkpoint to {self._directory} failed ({type(err).__name__}: {err})"
            ) from None

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax's resources."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()


class PreemptionFlag(_Closing):
    """Turns ``SIGTERM`` into a flag for the training loop to poll.

    Installs its handler on construction; :meth:`close` (or leaving the ``with`` block)
    reinstates the previous one. Must be created in the main thread.

    Example::

        with CheckpointManager(dir) as ckpt, PreemptionFlag() as preempted:
            for step in range(start, steps):
                state = train_step(state, batch)
                if preempted():
                    ckpt.save(step, state, config=config, force=True)
                    break
    """

    def __init__(self) -> None:
        self._received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def __call__(self) -> bool:
        """Whether ``SIGTERM`` arrived since construction."""
        return self._received

    def close(self) -> None:
        """Reinstates the handler that was active before construction (idempotent)."""
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Handlers of the three items, so that a fresh manager can read their metadata."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, save_args, restore_args in (
        (STATE_ITEM, ocp.args.StandardSave, ocp.args.StandardRestore),
        (CONFIG_ITEM, ocp.args.JsonSave, ocp.args.JsonRestore),
        (META_ITEM, ocp.args.JsonSave, ocp.args.JsonRestore),
    ):
        registry.add(item, save_args)
        registry.add(item, restore_args)
    return registry


def _json_metrics(metrics: Mapping[str, float] | None) -> dict[str, float] | None:
    """``metrics`` with every value (Python, NumPy or JAX scalar) as a Python float."""
    if metrics is None:
        return None
    try:
        return {str(name): float(value) for name, value in metrics.items()}
    except (TypeError, ValueError) as err:
        raise TypeError(f"metrics must map names to numbers, got {metrics!r}") from err


def _require_json(name: str, value: Any) -> None:
    """Raises ``TypeError`` now if ``value`` cannot be written as JSON.

    Saves are asynchronous, so Orbax would only report it at the next save.
    """
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be JSON-serialisable: {err}") from err


def _restore_args(state_template: Any) -> ocp.args.Composite:
    """Restores all three items, the state onto ``state_template``."""
    return ocp.args.Composite(
        **{
            STATE_ITEM: ocp.args.StandardRestore(state_template),
            CONFIG_ITEM: ocp.args.JsonRestore(),
            META_ITEM: ocp.args.JsonRestore(),
        }
    )


def _first_mismatch(saved_tree: Any, template: Any) -> str | None:
    """Describes the first key path where ``template`` and the saved tree differ.

    Key paths are compared as Orbax names them (dict keys, dataclass fields, sequence
    indices), in the template's leaf order, then the checkpoint's extra paths. A shape
    differs if both leaves carry one and they are unequal; dtypes may differ (the
    restore casts). Returns ``None`` if the trees match.
    """
    saved = ocp.tree.to_flat_dict(saved_tree)
    expected = ocp.tree.to_flat_dict(template)
    problems = [_leaf_mismatch(key, saved.get(key), leaf) for key, leaf in expected.items()]
    problems += [
        f"{_path(key)!r} is in the checkpoint but not in the template"
        for key in saved
        if key not in expected
    ]
    problems = [problem for problem in problems if problem is not None]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more mismatching key paths)" if len(problems) > 1 else ""
    return problems[0] + more


def _leaf_mismatch(key: tuple[str, ...], saved: Any, expected: Any) -> str | None:
    """Why the saved leaf at ``key`` cannot be restored onto ``expected``, or ``None``."""
    if saved is None:
        return f"{_path(key)!r} is in the template but not in the checkpoint"
    saved_shape, expected_shape = _shape(saved), _shape(expected)
    if saved_shape is not None and saved_shape != expected_shape:
        return (
            f"{_path(key)!r} has shape {saved_shape} in the checkpoint but "
            f"{expected_shape} in the template"
        )
    return None


def _path(key: tuple[str, ...]) -> str:
    """``('params', 'dense', 'kernel')`` -> ``'params/dense/kernel'``."""
    return "/".join(key)


def _shape(leaf: Any) -> tuple[int, ...] | None:
    """Shape of an array, array metadata or scalar leaf (``None`` if it has none)."""
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return None if shape is None else tuple(shape)
