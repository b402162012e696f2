"""Statistics over seeds and the study report's aggregation, against hand-computed
values."""

from __future__ import annotations

import math

import pytest

from sdpoint_jax.compare.statistics import paired_difference, summarize, t_interval
from sdpoint_jax.compare.study import full_settings, learning_curves, plot_curves, study_table
from sdpoint_jax.config import cifar_config


def test_summary_is_the_mean_and_sample_standard_deviation():
    # mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9, / (n - 1) = 7/3
    assert summarize([1.0, 2.0, 4.0]) == pytest.approx(
        {"n": 3, "mean": 7 / 3, "std": math.sqrt(7 / 3)}
    )
    assert summarize([5.0]) == {"n": 1, "mean": 5.0, "std": None}
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_paired_difference_and_its_student_t_interval():
    # differences 1, 2, 4 (seeds 0, 1, 2; seed 7 is unpaired): mean 2.3333333,
    # std 1.5275252; t(0.975, 2 dof) = 4.3026527; half width 4.3026527 * 1.5275252 /
    # sqrt(3) = 3.7945830
    paired = paired_difference({0: 11.0, 1: 12.0, 2: 14.0, 7: 0.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert paired["seeds"] == [0, 1, 2]
    assert paired["mean"] == pytest.approx(2.3333333, abs=1e-6)
    assert paired["std"] == pytest.approx(1.5275252, abs=1e-6)
    assert paired["ci_low"] == pytest.approx(-1.4612497, abs=1e-6)
    assert paired["ci_high"] == pytest.approx(6.1279164, abs=1e-6)
    # two values: t(0.975, 1 dof) = 12.7062047; differences 1, 3: std sqrt(2)
    assert t_interval([1.0, 3.0]) == pytest.approx((2 - 12.7062047, 2 + 12.7062047), abs=1e-6)
    single = paired_difference({0: 3.0}, {0: 1.0})
    assert (single["mean"], single["std"], single["ci_low"]) == (2.0, None, None)
    with pytest.raises(ValueError, match=r"no seed in common to pair: \[1\] and \[0\]"):
        paired_difference({1: 1.0}, {0: 1.0})
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        t_interval([1.0])


def setting(method, seed, name, gflops, error, kind="setting"):
    return {
        "method": method,
        "curve": method,
        "kind": kind,
        "setting": name,
        "gflops": gflops,
        "top1_error": error,
        "seed": seed,
    }


ROWS = [
    *(setting("baseline", s, "full", 2.0, e) for s, e in ((0, 40.0), (1, 42.0), (2, 44.0))),
    *(
        row
        for s, full, cheap, stochastic in (
            (0, 39.0, 38.0, 37.0),
            (1, 40.0, 43.0, 39.0),
            (2, 40.0, 41.0, 42.0),
        )
        for row in (
            setting("sdpoint", s, "full", 2.0, full),
            setting("sdpoint", s, "1:0.5", 1.0, cheap),
            # pooling after the last block: the pooling's FLOPs on top of the full network's
            setting("sdpoint", s, "3:0.75", 2.001, 50.0),
            {**setting("sdpoint", s, "1:0.5", 1.0, 1.0), "curve": "sdpoint-ubn"},  # not counted
            setting("sdpoint", s, "20 passes", 40.0, stochastic, kind="stochastic"),
        )
    ),
    setting("dropout", 0, "deterministic", 2.0, 41.0),
    setting("dropout", 0, "20 passes", 40.0, 40.0, kind="stochastic"),
]
FULL = {"baseline": "full", "sdpoint": "full", "dropout": "deterministic"}  # full_settings


def log(accuracies, evaluations):
    """A train_log: one row per step (2 steps per epoch), each evaluation after its step."""
    evaluated = {step: (error, seconds) for step, error, seconds in evaluations}
    rows = []
    for step, accuracy in enumerate(accuracies, start=1):
        rows.append({"step": step, "loss": 1.0, "accuracy": accuracy})
        if step in evaluated:
            error, seconds = evaluated[step]
            rows.append({"step": step, "eval_top1_error": error, "train_seconds": seconds})
    return rows


LOGS = {
    ("baseline", 0): log([0.5, 0.7, 0.8, 1.0], [(2, 60.0, 10.0), (4, 44.0, 20.0)]),
    ("baseline", 1): log([0.6, 0.6, 0.9, 0.9], [(2, 50.0, 12.0), (4, 40.0, 24.0)]),
    ("baseline", 2): log([0.5] * 4, [(2, 70.0, 11.0), (4, 60.0, 22.0)]),
    **{("sdpoint", s): log([0.5] * 4, [(2, 45.0, 9.0), (4, 40.0, 18.0)]) for s in (0, 1, 2)},
    ("dropout", 0): log([0.5] * 4, [(4, 41.0, 30.0)]),
}


def find(table, section, method, quantity):
    (row,) = [
        r
        for r in table
        if (r["section"], r["method"], r["quantity"]) == (section, method, quantity)
    ]
    return row


def test_study_table_from_hand_made_rows_and_logs():
    table = study_table(ROWS, LOGS, FULL, targets=(50.0, 58.0))
    baseline = find(table, "top1_error", "baseline", "full")
    assert (baseline["n"], baseline["runs"], baseline["mean"]) == (3, 3, 42.0)
    assert baseline["std"] == pytest.approx(2.0)
    assert baseline["values"] == [40.0, 42.0, 44.0] and baseline["seeds"] == [0, 1, 2]
    assert find(table, "top1_error", "sdpoint", "full")["mean"] == pytest.approx(119 / 3)
    assert find(table, "top1_error", "sdpoint", "full")["std"] == pytest.approx(math.sqrt(1 / 3))
    best = find(table, "top1_error", "sdpoint", "best")  # per seed: 38, 40, 40
    assert best["values"] == [38.0, 40.0, 40.0]
    assert best["std"] == pytest.approx(math.sqrt(4 / 3))
    assert find(table, "top1_error", "sdpoint", "stochastic")["values"] == [37.0, 39.0, 42.0]
    assert find(table, "top1_error", "baseline", "best")["values"] == [40.0, 42.0, 44.0]
    # SDPoint's full minus the baseline's full: -1, -2, -4
    paired = find(table, "paired", "sdpoint - baseline", "full")
    assert paired["values"] == [-1.0, -2.0, -4.0]
    assert paired["mean"] == pytest.approx(-7 / 3)
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx((-6.1279164, 1.4612497), abs=1e-6)
    assert find(table, "paired", "sdpoint - baseline", "stochastic")["values"] == [-3.0, -3.0, -2.0]
    dropout = find(table, "paired", "dropout - baseline", "stochastic")
    assert (dropout["values"], dropout["std"], dropout["ci_low"]) == ([0.0], None, None)
    assert not [r for r in table if r["method"] == "baseline - baseline"]
    seconds = find(table, "train_seconds", "baseline", "train")
    assert seconds["values"] == [20.0, 24.0, 22.0] and seconds["std"] == pytest.approx(2.0)
    # baseline test accuracy 40 -> 56 (seed 0), 50 -> 60 (seed 1), 30 -> 40 (seed 2)
    to_50 = find(table, "time_to_accuracy", "baseline", "seconds_to_50")
    assert (to_50["n"], to_50["runs"], to_50["values"]) == (2, 3, [20.0, 12.0])
    assert find(table, "time_to_accuracy", "baseline", "steps_to_50")["values"] == [4, 2]
    assert find(table, "time_to_accuracy", "baseline", "seconds_to_58")["values"] == [24.0]
    assert find(table, "time_to_accuracy", "sdpoint", "seconds_to_50")["values"] == [9.0] * 3
    assert find(table, "time_to_accuracy", "sdpoint", "seconds_to_58")["mean"] == 18.0
    assert not [r for r in table if r["section"] == "time_to_accuracy" and r["method"] == "dropout"]
    unreached = study_table(ROWS, LOGS, FULL, targets=(99.0,))
    assert find(unreached, "time_to_accuracy", "baseline", "seconds_to_99")["n"] == 0


def test_study_needs_the_monitored_test_error():
    logs = {("baseline", 0): [{"step": 1, "loss": 1.0, "accuracy": 0.5}]}
    with pytest.raises(ValueError, match=r"baseline \(seed 0\).*compare.monitor = True"):
        study_table(ROWS, logs, FULL)


def test_learning_curves_average_epochs_and_seeds(tmp_path):
    curves = learning_curves(LOGS, steps_per_epoch=2)
    # training error per epoch and seed: (40, 10), (40, 10), (50, 50)
    assert curves["baseline"]["train_epochs"] == [1.0, 2.0]
    assert curves["baseline"]["train_error"] == pytest.approx([130 / 3, 70 / 3])
    assert curves["baseline"]["test_epochs"] == [1.0, 2.0]
    assert curves["baseline"]["test_error"] == pytest.approx([60.0, 48.0])
    assert curves["dropout"]["test_epochs"] == [2.0]
    incomplete = learning_curves({("baseline", 0): LOGS["baseline", 0][:4]}, steps_per_epoch=2)
    assert incomplete["baseline"]["train_epochs"] == [1.0]  # epoch 2 has one step logged
    plot_curves(curves, tmp_path / "curves.png", "title")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_full_settings_are_the_methods_own():
    config = cifar_config("wrn-10-1", "cifar10")
    assert full_settings(config, FULL) == FULL
