"""Confidence cascade across SDPoint instances: threshold fitting for a target average
cost, stage choice, cumulative costs, the runtime cascade against the simulation on
the same probabilities, and ``evaluate --cascade`` on a tiny run on real CIFAR-10."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.prefix import shares_prefix
from sdpoint_jax.evaluation.budget import budgeted_stops
from sdpoint_jax.evaluation.cascade import (
    Cascade,
    StageRun,
    _staged_fn,
    bucket_size,
    budget_targets,
    cascade_rows,
    cascade_stages,
    cumulative_gflops,
    instance_probabilities,
    prefix_plan,
    stage_costs,
    top1_errors,
)
from sdpoint_jax.evaluation.workflow import cascade_holdout, evaluate_run
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training.loop import train
from sdpoint_jax.training.run_dir import RunDir, Source, read_rows_json
from tests.conftest import needs_cifar10, random_variables, tiny_cifar10_config

STAGES = [Instance(1, 0.5), Instance(2, 0.5), Instance.full()]
STAGE_GFLOPS = [0.5, 1.0, 2.0]
SINGLE_ROWS = [  # test results of single instances; 2:0.75 is off the Pareto front
    {"point": 1, "ratio": 0.5, "gflops": 0.5, "top1_error": 60.0, "bn_mode": "instance"},
    {"point": 2, "ratio": 0.75, "gflops": 0.9, "top1_error": 70.0, "bn_mode": "instance"},
    {"point": 2, "ratio": 0.5, "gflops": 1.0, "top1_error": 40.0, "bn_mode": "instance"},
    {"point": 0, "ratio": 1.0, "gflops": 2.0, "top1_error": 30.0, "bn_mode": "instance"},
    {"point": 0, "ratio": 1.0, "gflops": 2.0, "top1_error": 1.0, "bn_mode": "uniform"},
]


def synthetic_probs(n: int, seed: int, stages: int = 3, classes: int = 10):
    """Softmax probabilities ``(stages, n, classes)`` and labels: later stages are
    sharper and more often right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(stages, n, classes))
    for stage in range(stages):
        logits[stage, np.arange(n), labels] += 0.5 + 0.8 * stage
        logits[stage] *= 1.0 + 0.3 * stage
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32), labels


def test_thresholds_meet_the_target_average_cost_on_the_fit_set():
    fit_probs, _ = synthetic_probs(3000, seed=0)
    test_probs, labels = synthetic_probs(2000, seed=1)
    rows = cascade_rows(
        fit_probs,
        test_probs,
        labels,
        STAGES,
        STAGE_GFLOPS,
        full_gflops=2.0,
        budget_points=6,
        single_rows=SINGLE_ROWS,
    )
    np.testing.assert_allclose([r["target_gflops"] for r in rows], np.linspace(0.5, 2.0, 8)[1:-1])
    costs = np.array([0.5, 1.5, 3.5])  # a sample stopping at stage i ran stages 1..i
    for row in rows:
        assert abs(row["fit_avg_gflops"] - row["target_gflops"]) <= 0.02 * row["target_gflops"]
        assert row["stages"] == "1:0.5,2:0.5,full"
        # the test average is the cumulative cost of where the thresholds stop each sample
        thresholds = [*map(float, row["thresholds"].split(",")), -np.inf]
        stops = budgeted_stops(test_probs, thresholds)
        assert row["avg_gflops"] == pytest.approx(costs[stops].mean())
        fractions = [float(f) for f in row["stage_fractions"].split(",")]
        np.testing.assert_allclose(fractions, np.bincount(stops, minlength=3) / len(stops))
        predictions = np.argmax(test_probs[stops, np.arange(len(labels))], axis=-1)
        assert row["top1_error"] == pytest.approx(100 * np.mean(predictions != labels))
        assert abs(row["avg_gflops"] - row["target_gflops"]) <= 0.1 * row["target_gflops"]
        # best single per-instance-BN instance within the cascade's average cost
        fitting = [
            r
            for r in SINGLE_ROWS
            if r["bn_mode"] == "instance" and r["gflops"] <= row["avg_gflops"]
        ]
        best = min(fitting, key=lambda r: r["top1_error"])
        assert row["single_instance"] == str(Instance(best["point"], best["ratio"]))
        assert row["single_top1_error"] == best["top1_error"]
        assert row["error_vs_single"] == pytest.approx(row["top1_error"] - best["top1_error"])
        assert row["beats_single"] == (row["top1_error"] < best["top1_error"])
        assert (row["fit_examples"], row["examples"]) == (3000, 2000)
    assert rows[0]["top1_error"] > rows[-1]["top1_error"]  # more budget, fewer errors


def test_targets_stay_within_the_reachable_costs():
    np.testing.assert_allclose(budget_targets(STAGE_GFLOPS, 2.0, 2), [1.0, 1.5])
    # stages of 1.0 and 1.2 GFLOPs reach 2.2 at most: of 1.75, 2.5, 3.25 only 1.75
    np.testing.assert_allclose(budget_targets([1.0, 1.2], 4.0, 3), [1.75])
    with pytest.raises(ValueError, match="budget_points must be >= 1, got 0"):
        budget_targets(STAGE_GFLOPS, 2.0, 0)
    for one_stage, full in (([1.0], 2.0), ([2.0], 2.0)):
        with pytest.raises(ValueError, match=r"reachable by 1 stage\(s\).*at least two stages"):
            budget_targets(one_stage, full, 4)


def test_cumulative_gflops():
    np.testing.assert_allclose(cumulative_gflops(STAGE_GFLOPS), [0.5, 1.5, 3.5])
    for bad in ([], [1.0, 0.0], [[1.0]]):
        with pytest.raises(ValueError, match="one positive cost per stage"):
            cumulative_gflops(bad)


def test_stages_are_the_pareto_front_by_cost():
    gflops = [4.0, 1.0, 2.0, 2.0, 8.0, 3.0, 5.0]
    errors = [20.0, 50.0, 40.0, 35.0, 15.0, 45.0, 20.0]
    # 2.0 GFLOPs: only the lower error; 3.0 errs more than 2.0; 5.0 no less than 4.0
    assert cascade_stages(gflops, errors) == [1, 3, 0, 4]
    with pytest.raises(ValueError, match="3 costs and 2 errors"):
        cascade_stages([1.0, 2.0, 3.0], [1.0, 2.0])


def test_top1_errors():
    probs, labels = synthetic_probs(50, seed=2, stages=2)
    expected = [100 * np.mean(np.argmax(p, -1) != labels) for p in probs]
    np.testing.assert_allclose(top1_errors(probs, labels), expected)
    with pytest.raises(ValueError, match=r"labels \(N,\)"):
        top1_errors(probs, labels[:-1])


def test_cascade_rows_errors():
    probs, labels = synthetic_probs(100, seed=3)
    kwargs = {"full_gflops": 2.0, "budget_points": 2, "single_rows": SINGLE_ROWS}
    with pytest.raises(ValueError, match="of the 2 stages"):
        cascade_rows(probs, probs, labels, STAGES[:2], STAGE_GFLOPS[:2], **kwargs)
    with pytest.raises(ValueError, match=r"one cost per stage \(3\), got 2"):
        cascade_rows(probs, probs, labels, STAGES, STAGE_GFLOPS[:2], **kwargs)


def test_bucket_size():
    assert [bucket_size(n, 20) for n in (1, 2, 3, 5, 8, 9, 16, 17, 20)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        16,
        20,
        20,
    ]
    for bad in (0, 21):
        with pytest.raises(ValueError, match=rf"remaining must lie in \[1, 20\], got {bad}"):
            bucket_size(bad, 20)


# ---------------------------------------------------------------------- runtime cascade

HW = (16, 16)
RUNTIME_STAGES = [Instance(1, 0.5), Instance(3, 0.5), Instance.full()]


@pytest.fixture(scope="module")
def tiny_model():
    model = create("wrn-10-1", num_classes=10, ratios=(0.5,))
    return model, random_variables(model, seed=5)


@pytest.fixture(scope="module")
def simulated(tiny_model):
    """20 random images, their probabilities under each runtime stage computed on two
    batches of 12 (the last 4 examples padding), and labels."""
    model, variables = tiny_model
    rng = np.random.default_rng(6)
    images = (1.5 * rng.normal(size=(24, *HW, 3)) + 0.3).astype(np.float32)
    labels = rng.integers(0, 10, 24).astype(np.int32)
    mask = np.r_[np.ones(20), np.zeros(4)].astype(np.float32)
    batches = [
        {"image": images[i : i + 12], "label": labels[i : i + 12], "mask": mask[i : i + 12]}
        for i in (0, 12)
    ]
    probs, kept = instance_probabilities(model, variables, batches, RUNTIME_STAGES)
    assert probs.shape == (3, 20, 10) and probs.dtype == np.float32
    np.testing.assert_array_equal(kept, labels[:20])
    return images[:20], probs


def midpoint_threshold(confidence: np.ndarray, stopping: int) -> float:
    """A threshold that lets exactly the ``stopping`` most confident samples stop, half
    way between two confidences (far from either, so rounding cannot move a sample)."""
    ordered = np.sort(confidence)[::-1]
    assert ordered[stopping - 1] - ordered[stopping] > 1e-4
    return float(ordered[stopping - 1] + ordered[stopping]) / 2


def test_runtime_cascade_equals_the_simulation(tiny_model, simulated):
    model, variables = tiny_model
    images, probs = simulated
    confidence = probs.max(axis=-1)
    first = midpoint_threshold(confidence[0], 6)  # 6 of 20 stop at stage 1
    left = confidence[0] < first
    second = midpoint_threshold(confidence[1, left], 7)  # 7 of the 14 left at stage 2
    thresholds = [first, second, 0.99]  # the last stage takes all, whatever its threshold
    out = Cascade(model, variables, RUNTIME_STAGES, thresholds)(images)

    stops = budgeted_stops(probs, thresholds)
    np.testing.assert_array_equal(out.stage, stops)
    assert np.bincount(stops).tolist() == [6, 7, 7]
    reached = probs[stops, np.arange(len(stops))]
    np.testing.assert_allclose(out.probs, reached, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.predictions, np.argmax(reached, axis=-1))
    # later stages see only the samples left, at power-of-two batch sizes
    assert out.evaluated == (20, 14, 7)
    assert out.batch_sizes == (20, 16, 8)

    everyone_stops = Cascade(model, variables, RUNTIME_STAGES, [0.0, 0.0, 0.0])(images)
    assert everyone_stops.evaluated == (20, 0, 0) and everyone_stops.batch_sizes == (20, 0, 0)
    np.testing.assert_array_equal(everyone_stops.stage, np.zeros(20))
    np.testing.assert_allclose(everyone_stops.probs, probs[0], rtol=1e-5, atol=1e-6)


def test_prefix_reuse_gives_the_outputs_of_each_stage_from_the_image(tiny_model, simulated):
    """Every sample runs every stage: stage 2 resumes from stage 1's map at point 1,
    stage 3 from stage 2's at point 3; the last stage's probabilities are the full
    network's from the image (the runtime test above checks stages 1 and 2 the same
    way, with samples stopping there)."""
    model, variables = tiny_model
    images, probs = simulated
    cascade = Cascade(model, variables, RUNTIME_STAGES, [1.1, 1.1, 0.0])
    assert cascade.plan == (StageRun(0, 1), StageRun(1, 3), StageRun(3, 0))
    out = cascade(images[:8])
    assert out.evaluated == (8, 8, 8)
    np.testing.assert_array_equal(out.stage, np.full(8, 2))
    np.testing.assert_allclose(out.probs, probs[2, :8], rtol=1e-5, atol=1e-6)
    from_image = Cascade(model, variables, RUNTIME_STAGES, [1.1, 1.1, 0.0], reuse_prefix=False)
    assert from_image.plan == (StageRun(0, 0),) * 3


def test_prefix_plan_resumes_from_the_deepest_shared_point():
    space = create("wrn-16-1", ratios=(0.5, 0.75)).space  # points 1..6
    stages = [Instance(3, 0.5), Instance(1, 0.5), Instance(3, 0.75), Instance(2, 0.75)]
    stages.append(Instance.full())
    for bn_mode in ("instance", "uniform"):  # both key blocks 1..p as the full network
        assert prefix_plan(stages, space, bn_mode) == (
            StageRun(0, 3),  # kept for 3:0.75 and full
            StageRun(0, 1),  # point 3 lies past 1:0.5's point
            StageRun(3, 0),  # point 3 was kept by stage 1
            StageRun(1, 0),  # 3 > 2: resumes from 1:0.5's point 1
            StageRun(3, 0),  # the full network's maps are all full size
        )
        assert prefix_plan(stages, space, bn_mode, reuse=False) == (StageRun(0, 0),) * 5
    full, early = Instance.full(), Instance(2, 0.5)
    assert shares_prefix(full, early, 2, space, "instance")
    assert not shares_prefix(full, early, 3, space, "instance")  # 2:0.5 pooled at 2
    assert not shares_prefix(full, full, 0, space, "instance")


def test_accounted_flops_are_those_of_the_layers_run(tiny_model):
    """A stage's accounted cost is the counter's count of the layers after its resume
    point: its instance without the full network's prefix. The compiled program runs
    just those layers: XLA's cost analysis of the resumed program falls short of the
    one from the image by the prefix the counter leaves out (``conv_taps="valid"``,
    XLA's convention; to 0.1%, as in tests/models)."""
    model, variables = tiny_model
    staged = _staged_fn(model)
    full_flops = count_flops(model, Instance.full(), HW)
    costs = stage_costs(model, RUNTIME_STAGES, HW)
    summed = stage_costs(model, RUNTIME_STAGES, HW, "summed")
    plan = prefix_plan(RUNTIME_STAGES, model.space, model.bn_mode)
    maps = {0: (1, *HW, 3), 1: (1, *HW, 16), 3: (1, 4, 4, 64)}  # tap maps of wrn-10-1
    for stage, run, cost, whole in zip(RUNTIME_STAGES, plan, costs, summed, strict=True):
        assert whole * 1e9 == count_flops(model, stage, HW)
        prefix = full_flops - count_flops(model, Instance.full(), HW, start=run.start)
        assert cost * 1e9 == count_flops(model, stage, HW, start=run.start)
        assert cost * 1e9 == count_flops(model, stage, HW) - prefix
        xla = [
            staged.lower(
                variables, np.zeros(maps[start], np.float32), stage, start, 0, HW
            ).cost_analysis()["flops"]
            for start in (0, run.start)
        ]
        valid = [count_flops(model, stage, HW, start=s, conv_taps="valid") for s in (0, run.start)]
        # the compiled program leaves out the prefix the counter leaves out
        assert xla[0] - xla[1] == pytest.approx(valid[0] - valid[1], rel=1e-3)
    assert costs[0] == summed[0] and all(costs[1:] < summed[1:])
    with pytest.raises(ValueError, match="accounting must be one of"):
        stage_costs(model, RUNTIME_STAGES, HW, "sum")
    with pytest.raises(ValueError, match=r"start must be a point in 0..1 .* got 2"):
        count_flops(model, Instance(1, 0.5), HW, start=2)


def test_runtime_cascade_errors(tiny_model):
    model, variables = tiny_model
    with pytest.raises(ValueError, match=r"need 3 thresholds \(one per stage, no NaN\)"):
        Cascade(model, variables, RUNTIME_STAGES, [0.5, 0.5])
    with pytest.raises(ValueError, match="no NaN"):
        Cascade(model, variables, RUNTIME_STAGES, [0.5, np.nan, 0.0])
    with pytest.raises(ValueError, match="point 4 is out of range"):
        Cascade(model, variables, [Instance(4, 0.5)], [0.0])
    with pytest.raises(ValueError, match="at least one stage"):
        Cascade(model, variables, [], [])
    cascade = Cascade(model, variables, RUNTIME_STAGES, [0.5, 0.5, 0.0])
    with pytest.raises(
        ValueError, match=r"need images \(B >= 1, H, W, 3\), got shape \(16, 16, 3\)"
    ):
        cascade(np.zeros((16, 16, 3), np.float32))


def test_instance_probabilities_errors(tiny_model):
    model, variables = tiny_model
    padding = {
        "image": np.zeros((4, *HW, 3), np.float32),
        "label": np.zeros(4, np.int32),
        "mask": np.zeros(4, np.float32),
    }
    with pytest.raises(ValueError, match="no real examples"):
        instance_probabilities(model, variables, [padding], [Instance.full()])
    with pytest.raises(ValueError, match="at least one instance"):
        instance_probabilities(model, variables, [padding], [])


# ------------------------------------------------------------------ evaluate --cascade


def tiny_config():
    return tiny_cifar10_config(
        {
            "sdpoint.ratios": (0.5,),
            "optim.batch_size": 16,
            "run.max_steps": 16,  # enough for the instances' held-out errors to differ
            "run.log_every_steps": 1,
            "run.eval_every_epochs": 1000.0,  # no evaluation inside this short run
            "data.train_split": "train[:64]",
            "data.holdout_split": "train[64:112]",
            "data.eval_split": "test[:48]",
            "data.eval_batch_size": 16,
            "cascade.budget_points": 4,
        },
    )


def test_cascade_needs_a_holdout_split(capsys):
    config = tiny_config()
    config.data.holdout_split = None
    with pytest.raises(ValueError, match=r"holdout_split is not set.*train_split=train\[:45000\]"):
        evaluate_run(config, "/nonexistent", cascade=True)
    config.data.holdout_split = "train[45000:]"
    assert cascade_holdout(config) == "train[45000:]"
    assert "warning" not in capsys.readouterr().out
    config.data.train_split = None
    assert cascade_holdout(config) == "train[45000:]"
    assert "warning: config.data.train_split is not set" in capsys.readouterr().out


@pytest.mark.slow
@needs_cifar10
def test_evaluate_cascade_on_a_tiny_run(tmp_path):
    config = tiny_config()
    train(config, tmp_path, resume=False)
    rows = evaluate_run(config, tmp_path, "full,1:0.5,3:0.5", cascade=True)
    instance_rows = [r for r in rows if r["bn_mode"] == "instance"]
    run_dir = RunDir(tmp_path)
    with open(run_dir.cascade_csv, newline="") as file:
        table = list(csv.DictReader(file))
    cascade, source = read_rows_json(run_dir.cascade_json)
    assert source == Source(run_dir.training_step(), "running-average")
    assert run_dir.is_current(run_dir.cascade_json) and run_dir.is_current(run_dir.results_json)
    assert 1 <= len(cascade) == len(table) <= config.cascade.budget_points
    gflops = {str(Instance(r["point"], r["ratio"])): r["gflops"] for r in instance_rows}
    stages = cascade[0]["stages"].split(",")
    assert len(stages) >= 2 and set(stages) <= set(gflops) == {"full", "1:0.5", "3:0.5"}
    assert [gflops[s] for s in stages] == sorted(gflops[s] for s in stages)
    reach = sum(gflops[s] for s in stages)
    for row, line in zip(cascade, table, strict=True):
        assert float(line["avg_gflops"]) == pytest.approx(row["avg_gflops"])
        assert row["accounting"] == line["accounting"] == "prefix"
        assert gflops[stages[0]] <= row["avg_gflops"] <= reach + 1e-9
        assert abs(row["fit_avg_gflops"] - row["target_gflops"]) <= 0.1 * row["target_gflops"]
        assert 0.0 <= row["top1_error"] <= 100.0 and row["examples"] == 48
        assert row["fit_examples"] == 48
        assert row["single_gflops"] <= row["avg_gflops"] * (1 + 1e-9)
    assert (tmp_path / "cost_error.png").stat().st_size > 0
