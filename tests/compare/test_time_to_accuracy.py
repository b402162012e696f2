"""Time-to-accuracy driver: the per-setting summary of a training log, the settings'
switches, and a tiny end-to-end run on real CIFAR-10."""

from __future__ import annotations

import csv

import ml_collections
import pytest

from sdpoint_jax.compare.time_to_target import setting_config, summarize, time_to_accuracy
from sdpoint_jax.config import cifar_config
from tests.conftest import needs_cifar10, tiny_cifar10_config


def test_summary_takes_the_first_evaluation_at_or_above_each_target():
    rows = [
        {"step": 0, "compile_seconds": 7.0},
        {"step": 5, "loss": 2.0, "train_seconds": 1.0},
        {"step": 10, "eval_top1_accuracy": 40.0, "train_seconds": 2.0},
        {"step": 20, "eval_top1_accuracy": 55.0, "train_seconds": 4.5},
        {"step": 30, "eval_top1_accuracy": 52.0, "train_seconds": 6.0},
        {"step": 40, "eval_top1_accuracy": 61.0, "train_seconds": 8.0},
        {"step": 40, "draws": {"full": 25, "low:2": 15}},
    ]
    summary = summarize(rows, targets=(50.0, 60.0, 90.0))
    assert summary == {
        "steps": 40,
        "low_mode_steps": 15,
        "final_top1_accuracy": 61.0,
        "train_seconds": 8.0,
        "compile_seconds": 7.0,
        "seconds_to_50": 4.5,
        "steps_to_50": 20,
        "seconds_to_60": 8.0,
        "steps_to_60": 40,
        "seconds_to_90": None,
        "steps_to_90": None,
    }


def test_summary_adds_up_the_seconds_of_a_resumed_run():
    rows = [
        {"step": 0, "compile_seconds": 3.0},
        {"step": 10, "eval_top1_accuracy": 40.0, "train_seconds": 2.0},
        {"step": 20, "eval_top1_accuracy": 45.0, "train_seconds": 4.0},
        {"step": 20, "compile_seconds": 1.0},  # resumed here: the clock restarts
        {"step": 30, "eval_top1_accuracy": 55.0, "train_seconds": 2.5},
    ]
    summary = summarize(rows, targets=(50.0,))
    assert summary["train_seconds"] == 6.5
    assert summary["seconds_to_50"] == 6.5
    assert summary["compile_seconds"] == 4.0
    assert summary["low_mode_steps"] == 0


def test_summary_without_evaluation_is_an_error():
    with pytest.raises(ValueError, match="no evaluation"):
        summarize([{"step": 1, "loss": 2.0, "train_seconds": 1.0}], targets=(50.0,))


def test_settings_switch_sdpoint_and_low_mode():
    config = cifar_config("wrn-10-1", "cifar10")
    config.low_mode.prob = 0.5
    switches = {
        name: (c.sdpoint.enabled, c.low_mode.prob)
        for name in ("baseline", "low", "sdpoint", "sdpoint+low")
        for c in [setting_config(config, name)]
    }
    assert switches == {
        "baseline": (False, 0.0),
        "low": (False, 0.5),
        "sdpoint": (True, 0.0),
        "sdpoint+low": (True, 0.5),
    }
    assert config.low_mode.prob == 0.5  # the given config is left as it was
    with pytest.raises(ValueError, match="unknown training setting 'fast'"):
        setting_config(config, "fast")
    config.low_mode.prob = 0.0
    with pytest.raises(ValueError, match=r"'low' needs config\.low_mode\.prob > 0"):
        setting_config(config, "low")


@needs_cifar10
def test_end_to_end_trains_each_setting_once(tmp_path, capsys, compilation_cache_dir):
    config = tiny_cifar10_config(
        {
            "data.train_split": "train[:64]",
            "optim.batch_size": 16,
            "optim.num_epochs": 2,
            "optim.lr_drop_epochs": (1.5,),
            "low_mode.full_epochs_after_drop": 0.0,
            "low_mode.prob": 0.5,
            "run.eval_every_epochs": 1.0,
            "data.eval_split": "test[:32]",
            "data.eval_batch_size": 16,
            "run.log_every_steps": 1,
            "compile.cache_dir": str(compilation_cache_dir),
        },
    )
    config.time_to_accuracy = ml_collections.ConfigDict(
        {"training_settings": ("baseline", "sdpoint+low"), "accuracy_targets": (0.0, 101.0)}
    )

    rows = time_to_accuracy(config, tmp_path)
    assert [r["setting"] for r in rows] == ["baseline", "sdpoint+low"]
    baseline, both = rows
    assert baseline["steps"] == both["steps"] == 8
    assert baseline["low_mode_steps"] == 0 and 0 < both["low_mode_steps"] < 8
    for row in rows:
        assert row["steps_to_0"] == 4  # the first evaluation reaches 0%
        assert 0 < row["seconds_to_0"] < row["train_seconds"]
        assert row["seconds_to_101"] is None
    with open(tmp_path / "time_to_accuracy.csv") as file:
        assert [r["setting"] for r in csv.DictReader(file)] == ["baseline", "sdpoint+low"]

    logs = {s: (tmp_path / s / "train_log.jsonl").read_text() for s in ("baseline", "sdpoint+low")}
    assert time_to_accuracy(config, tmp_path) == rows  # finished runs are read back
    assert {s: (tmp_path / s / "train_log.jsonl").read_text() for s in logs} == logs
    assert "s to 0%" in capsys.readouterr().out
