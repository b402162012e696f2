"""The files of a run directory, and whether each derived one is current.

A run directory holds (every name is spelled here only)::

    WORKDIR/checkpoints/      training checkpoints (``train``)
    WORKDIR/train_log.jsonl   training metrics, one JSON object per line (``train``)
    WORKDIR/tensorboard/      the same metrics as TensorBoard summaries (``train``)
    WORKDIR/calibrated/       the latest training step with calibrated BN statistics
                              (``calibrate``)
    WORKDIR/results.{csv,json}, WORKDIR/cost_error.png   (``evaluate``)
    WORKDIR/cascade.{csv,json}                           (``evaluate --cascade``)
    WORKDIR/latency.json      latency table (``bench latency --out WORKDIR``), read by
                              ``select --budget-ms``

Staleness is decided by training step, never by file times. Evaluation uses the state
of :meth:`RunDir.evaluation_source`: the latest training step, with the calibrated BN
statistics when ``calibrated/`` holds that step, else the checkpoint's running averages.
``results.json`` and ``cascade.json`` record the :class:`Source` they were computed
from, as ``{"step": N, "statistics": "calibrated" | "running-average", "rows": [...]}``
(:func:`write_rows_json`); earlier versions wrote the bare list of rows, whose source is
unknown. :meth:`RunDir.is_current` compares the recorded source with the current one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CALIBRATED = "calibrated"
RUNNING_AVERAGE = "running-average"
STATISTICS = (CALIBRATED, RUNNING_AVERAGE)

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Source:
    """The training state an artifact is computed from: training step ``step`` with
    ``statistics`` ``"calibrated"`` (``calibrated/``) or ``"running-average"`` (the
    training checkpoint's running averages)."""

    step: int
    statistics: str

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {self.statistics!r}")

    def describe(self) -> str:
        """For progress output: which statistics, and how to get calibrated ones."""
        if self.statistics == CALIBRATED:
            return "calibrated statistics"
        return "running-average statistics (run `calibrate` to calibrate)"


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def calibrated(self) -> Path:
        return self.path / "calibrated"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def results_json(self) -> Path:
        return self.path / "results.json"

    @property
    def cost_error_png(self) -> Path:
        return self.path / "cost_error.png"

    @property
    def cascade_csv(self) -> Path:
        return self.path / "cascade.csv"

    @property
    def cascade_json(self) -> Path:
        return self.path / "cascade.json"

    @property
    def latency_json(self) -> Path:
        return self.path / "latency.json"

    def training_step(self) -> int | None:
        """The latest step in ``checkpoints/``; ``None`` when there is none."""
        return _latest_step(self.checkpoints)

    def calibrated_step(self) -> int | None:
        """The step of the calibrated statistics in ``calibrated/``; ``None`` when none."""
        return _latest_step(self.calibrated)

    def evaluation_source(self) -> Source | None:
        """The state evaluation uses now: the latest training step, calibrated when
        ``calibrated/`` holds that step; ``None`` when nothing is trained."""
        step = self.training_step()
        if step is None:
            return None
        statistics = CALIBRATED if self.calibrated_step() == step else RUNNING_AVERAGE
        return Source(step, statistics)

    def recorded_source(self, artifact: Path) -> Source | None:
        """The source ``artifact`` (``results_json`` or ``cascade_json``) records;
        ``None`` when it records none (written by an earlier version).

        Raises:
          FileNotFoundError: ``artifact`` does not exist.
          ValueError: ``artifact`` is not one of those files.
        """
        self._check_stamped(artifact)
        return read_rows_json(artifact)[1]

    def is_current(self, artifact: Path, source: Source | None = None) -> bool | None:
        """Whether ``artifact`` (``calibrated``, ``results_json`` or ``cascade_json``) was
        computed from ``source`` (default: :meth:`evaluation_source`); ``calibrated`` is
        current when it is of ``source``'s step.

        Returns:
          ``True`` or ``False``; ``False`` also when ``artifact`` is missing or nothing
          is trained; ``None`` when it exists but records no source (written by an
          earlier version).

        Raises:
          ValueError: ``artifact`` is none of those paths.
        """
        if artifact != self.calibrated:
            self._check_stamped(artifact)
        source = source or self.evaluation_source()
        if source is None:
            return False
        if artifact == self.calibrated:
            return self.calibrated_step() == source.step
        if not artifact.is_file():
            return False
        recorded = self.recorded_source(artifact)
        return None if recorded is None else recorded == source

    def _check_stamped(self, artifact: Path) -> None:
        stamped = (self.results_json, self.cascade_json)
        if artifact not in stamped:
            names = ", ".join(str(p) for p in (self.calibrated, *stamped))
            raise ValueError(f"{artifact} is not an artifact with a source; one of {names}")


def write_rows_json(path: Path, rows: Sequence[Row], source: Source) -> None:
    """Writes ``{"step", "statistics", "rows"}`` to ``path`` (full float precision)."""
    record = {"step": source.step, "statistics": source.statistics, "rows": list(rows)}
    with open(path, "w") as file:
        json.dump(record, file, indent=1)
        file.write("\n")


def read_results(directory: str | Path) -> list[Row]:
    """The evaluation rows of run directory ``directory``, written by
    :func:`sdpoint_jax.evaluation.evaluate.write_results` (from ``results.json``, typed;
    also the bare list of rows earlier versions wrote)."""
    path = RunDir(directory).results_json
    if not path.is_file():
        raise FileNotFoundError(
            f"no evaluation results at {path}; run the evaluate command (or write_results) first"
        )
    return read_rows_json(path)[0]


def read_rows_json(path: Path) -> tuple[list[Row], Source | None]:
    """The rows and source of a file written by :func:`write_rows_json`, or the rows of
    a bare list (an earlier version's file) with source ``None``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` holds neither form.
    """
    with open(path) as file:
        record = json.load(file)
    if isinstance(record, list):
        return record, None
    if not isinstance(record, dict) or not {"step", "statistics", "rows"} <= record.keys():
        raise ValueError(
            f"{path} holds neither a list of rows nor {{'step', 'statistics', 'rows'}}"
        )
    return record["rows"], Source(int(record["step"]), record["statistics"])


def _latest_step(directory: Path) -> int | None:
    """The latest checkpoint step in ``directory`` (``None`` when it holds none or does
    not exist; a missing directory is not created)."""
    if not directory.is_dir():
        return None
    from sdpoint_jax.training.checkpoint import CheckpointManager  # loads Orbax

    with CheckpointManager(directory) as manager:
        return manager.latest_step()
