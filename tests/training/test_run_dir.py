"""The run directory: every artifact's path, staleness by recorded training step and
statistics (also for the step-less ``results.json`` of earlier versions), and the
rounding of floats in CSV tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sdpoint_jax.evaluation.evaluate import csv_value, write_csv, write_results
from sdpoint_jax.training.checkpoint import CheckpointManager
from sdpoint_jax.training.run_dir import (
    CALIBRATED,
    RUNNING_AVERAGE,
    RunDir,
    Source,
    read_results,
    read_rows_json,
    write_rows_json,
)

ROWS = [{"point": 0, "ratio": 1.0, "top1_error": 41.559999999999995, "bn_mode": "instance"}]


def save_step(directory: Path, step: int) -> None:
    """A checkpoint of ``step`` in ``directory`` (a tiny state: only its step counts)."""
    with CheckpointManager(directory, keep_last=5) as manager:
        manager.save(step, {"w": np.zeros(2, np.float32)}, config={}, force=True)


def test_every_artifact_has_its_path(tmp_path):
    run_dir = RunDir(str(tmp_path))  # a str is taken as a path
    assert run_dir.path == tmp_path
    names = {
        "checkpoints": "checkpoints",
        "calibrated": "calibrated",
        "train_log": "train_log.jsonl",
        "tensorboard": "tensorboard",
        "results_csv": "results.csv",
        "results_json": "results.json",
        "cost_error_png": "cost_error.png",
        "cascade_csv": "cascade.csv",
        "cascade_json": "cascade.json",
        "latency_json": "latency.json",
    }
    for attribute, name in names.items():
        assert getattr(run_dir, attribute) == tmp_path / name
    with pytest.raises(AttributeError):
        run_dir.path = tmp_path / "other"  # frozen


def test_nothing_trained_nothing_current_and_nothing_created(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.training_step() is None and run_dir.evaluation_source() is None
    assert run_dir.is_current(run_dir.calibrated) is False
    assert run_dir.is_current(run_dir.results_json) is False
    assert not run_dir.path.exists()


def test_staleness_follows_the_recorded_step_and_statistics(tmp_path):
    run_dir = RunDir(tmp_path)
    save_step(run_dir.checkpoints, 4)
    assert run_dir.training_step() == 4 and run_dir.calibrated_step() is None
    assert run_dir.evaluation_source() == Source(4, RUNNING_AVERAGE)
    assert run_dir.is_current(run_dir.results_json) is False  # missing

    write_results(ROWS, tmp_path, Source(4, RUNNING_AVERAGE))
    write_rows_json(run_dir.cascade_json, ROWS, Source(4, RUNNING_AVERAGE))
    assert run_dir.is_current(run_dir.results_json) is True
    assert run_dir.is_current(run_dir.cascade_json) is True

    # calibrating step 4 makes the results of its running averages stale
    save_step(run_dir.calibrated, 4)
    assert run_dir.evaluation_source() == Source(4, CALIBRATED)
    assert run_dir.is_current(run_dir.calibrated) is True
    assert run_dir.is_current(run_dir.results_json) is False
    # ... though they still are for the state they were computed from
    assert run_dir.is_current(run_dir.results_json, Source(4, RUNNING_AVERAGE)) is True
    write_results(ROWS, tmp_path, Source(4, CALIBRATED))
    assert run_dir.is_current(run_dir.results_json) is True

    # training on makes the calibration and everything evaluated from it stale
    save_step(run_dir.checkpoints, 6)
    assert run_dir.evaluation_source() == Source(6, RUNNING_AVERAGE)
    assert run_dir.is_current(run_dir.calibrated) is False
    assert run_dir.is_current(run_dir.results_json) is False
    assert run_dir.is_current(run_dir.cascade_json) is False
    assert run_dir.recorded_source(run_dir.results_json) == Source(4, CALIBRATED)
    assert run_dir.recorded_source(run_dir.cascade_json) == Source(4, RUNNING_AVERAGE)


def test_results_of_an_earlier_version_are_read_with_an_unknown_source(tmp_path):
    run_dir = RunDir(tmp_path)
    save_step(run_dir.checkpoints, 2)
    run_dir.results_json.write_text(json.dumps(ROWS))  # the bare list written before
    assert read_results(tmp_path) == ROWS
    assert read_rows_json(run_dir.results_json) == (ROWS, None)
    assert run_dir.recorded_source(run_dir.results_json) is None
    assert run_dir.is_current(run_dir.results_json) is None


def test_bad_artifacts_and_sources_are_named(tmp_path):
    run_dir = RunDir(tmp_path)
    with pytest.raises(ValueError, match=r"results\.csv is not an artifact with a source"):
        run_dir.is_current(run_dir.results_csv)
    with pytest.raises(FileNotFoundError):
        run_dir.recorded_source(run_dir.results_json)
    with pytest.raises(ValueError, match=r"statistics must be one of .* got 'moving'"):
        Source(3, "moving")
    run_dir.cascade_json.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(ValueError, match=r"cascade\.json holds neither a list of rows nor"):
        run_dir.recorded_source(run_dir.cascade_json)


def test_json_keeps_full_precision_and_csv_rounds(tmp_path):
    run_dir = RunDir(tmp_path)
    write_results(ROWS, tmp_path, Source(1, CALIBRATED))
    assert json.loads(run_dir.results_json.read_text()) == {
        "step": 1,
        "statistics": CALIBRATED,
        "rows": ROWS,
    }
    lines = run_dir.results_csv.read_text().splitlines()
    assert lines == ["point,ratio,top1_error,bn_mode", "0,1.0,41.56,instance"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (41.559999999999995, "41.56"),
        (100.0 * (1 - 7 / 12), "41.66667"),
        (1 / 3, "0.3333333"),
        (0.041234567891, "0.04123457"),
        (np.float32(0.1), "0.1"),  # not 0.10000000149011612
        (np.float64(2.5), "2.5"),
        (1234567.89, "1234568.0"),
        (1.25e-7, "1.25e-07"),
        (float("nan"), "nan"),
        (float("-inf"), "-inf"),
    ],
)
def test_csv_floats_have_seven_significant_digits(value, text):
    assert csv_value(value) == text


def test_csv_leaves_other_values_alone(tmp_path):
    assert [csv_value(v) for v in (3, True, "0.30000000000000004", None)] == [
        3,
        True,
        "0.30000000000000004",
        None,
    ]
    path = tmp_path / "sub" / "table.csv"
    write_csv([{"a": 0.1 + 0.2, "b": 7}, {"b": 2, "c": "x"}], path)
    with open(path, newline="") as file:
        assert list(csv.DictReader(file)) == [
            {"a": "0.3", "b": "7", "c": ""},
            {"a": "", "b": "2", "c": "x"},
        ]
