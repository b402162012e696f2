"""Evaluation (errors against a direct computation, masks, files), plotting and selection."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.evaluation.evaluate import (
    RESULT_FIELDS,
    evaluate_instances,
    write_results,
)
from sdpoint_jax.evaluation.plot import plot_cost_error
from sdpoint_jax.evaluation.selection import pareto_front, select_instance
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training.parallel import create_mesh
from sdpoint_jax.training.run_dir import RunDir, Source, read_results
from tests.conftest import HW, make_batches, random_variables

PADDED = 3  # padding examples at the end of the last batch
LABEL_RANKS = (0, 2, 7)  # labels cycle through: top-1 hit, top-5 hit only, miss


def logits_of(model, variables, images: np.ndarray, instance: Instance, bn_mode: str):
    """Eval-mode logits of ``model`` read with the statistics of ``bn_mode``."""
    apply = model.clone(bn_mode=bn_mode).apply
    return np.asarray(apply(variables, images, instance=instance, train=False))


def direct_errors(logits: np.ndarray, labels: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 error in percent over the ``real`` examples."""
    top5 = np.argsort(-logits, axis=1)[:, :5]
    top1_hit = top5[:, 0] == labels
    top5_hit = (top5 == labels[:, None]).any(axis=1)
    return 100 * (1 - top1_hit[real].mean()), 100 * (1 - top5_hit[real].mean())


@pytest.fixture(scope="module")
def evaluated():
    """Every instance of a 4-instance model, both bn modes, on 3 batches of 8 whose
    last 3 examples are padding; labels sit at known ranks of the full network's logits,
    and padding examples get the top-1 label (so counting them would lower the error)."""
    model = create("wrn-10-1", num_classes=10, ratios=(0.5,))
    variables = random_variables(model, seed=3)
    images = np.concatenate([batch["image"] for batch in make_batches(seed=4)])
    order = np.argsort(-logits_of(model, variables, images, Instance.full(), "instance"), axis=1)
    ranks = np.resize(LABEL_RANKS, len(images))
    ranks[-PADDED:] = 0
    labels = order[np.arange(len(images)), ranks].astype(np.int32)
    mask = np.ones(len(images), np.float32)
    mask[-PADDED:] = 0
    batches = [
        {"image": image, "label": label, "mask": part}
        for image, label, part in zip(
            np.split(images, 3), np.split(labels, 3), np.split(mask, 3), strict=True
        )
    ]
    rows = evaluate_instances(model, variables, batches, list(model.space), input_hw=HW)
    return model, variables, batches, rows


def test_rows_cover_every_instance_and_bn_mode_with_costs(evaluated):
    model, _, batches, rows = evaluated
    expected = [(mode, inst) for mode in ("instance", "uniform") for inst in model.space]
    assert [(row["bn_mode"], Instance(row["point"], row["ratio"])) for row in rows] == expected
    full_flops = count_flops(model, Instance.full(), HW)
    for row in rows:
        assert list(row) == list(RESULT_FIELDS)
        flops = count_flops(model, Instance(row["point"], row["ratio"]), HW)
        assert row["gflops"] == pytest.approx(flops / 1e9)
        assert row["fraction"] == pytest.approx(flops / full_flops)
        assert row["examples"] == 3 * len(batches[0]["label"]) - PADDED


def test_errors_equal_direct_computation_over_real_examples(evaluated):
    model, variables, batches, rows = evaluated
    images, labels, mask = (np.concatenate([b[name] for b in batches]) for name in batches[0])
    for row in rows:
        instance = Instance(row["point"], row["ratio"])
        logits = logits_of(model, variables, images, instance, row["bn_mode"])
        top1, top5 = direct_errors(logits, labels, mask > 0)
        assert row["top1_error"] == pytest.approx(top1, abs=1e-9), row
        assert row["top5_error"] == pytest.approx(top5, abs=1e-9), row
    # The labels were placed at ranks 0, 2, 7 of the full network's logits, 7 each.
    full = rows[0]
    assert (full["top1_error"], full["top5_error"]) == pytest.approx((200 / 3, 100 / 3))
    assert len({row["top1_error"] for row in rows}) > 1


def test_mesh_and_uniform_model_reproduce_rows(evaluated):
    model, variables, batches, rows = evaluated
    instance = Instance(2, 0.5)
    (expected,) = [
        row
        for row in rows
        if row["bn_mode"] == "uniform" and Instance(row["point"], row["ratio"]) == instance
    ]
    on_mesh = evaluate_instances(
        model.clone(bn_mode="uniform"),
        variables,
        batches,
        [instance],
        input_hw=HW,
        bn_modes=("uniform",),
        mesh=create_mesh(),
    )
    assert on_mesh == [expected]


def test_non_finite_logits_count_as_errors(evaluated):
    """With a NaN classifier bias every logit is NaN: no example is a hit."""
    model, variables, batches, _ = evaluated
    classifier = variables["params"]["classifier"]
    params = {
        **variables["params"],
        "classifier": {**classifier, "bias": classifier["bias"] * np.nan},
    }
    results = evaluate_instances(
        model, {**variables, "params": params}, batches, [Instance.full()], input_hw=HW
    )
    assert [(row["top1_error"], row["top5_error"]) for row in results] == [(100.0, 100.0)] * 2


def test_bad_arguments_raise_clear_errors(evaluated):
    model, variables, batches, _ = evaluated
    uniform = model.clone(bn_mode="uniform")
    with pytest.raises(ValueError, match="bn_mode 'instance' cannot be evaluated"):
        evaluate_instances(uniform, variables, batches, [Instance.full()], input_hw=HW)
    with pytest.raises(ValueError, match="bn_mode must be one of"):
        evaluate_instances(
            model, variables, batches, [Instance.full()], input_hw=HW, bn_modes=("x",)
        )
    with pytest.raises(ValueError, match="images are 16x16, but input_hw is 32x32"):
        evaluate_instances(model, variables, batches, [Instance.full()], input_hw=(32, 32))
    unmasked = [{"image": b["image"], "label": b["label"]} for b in batches]
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['mask'\]"):
        evaluate_instances(model, variables, unmasked, [Instance.full()], input_hw=HW)


def test_results_round_trip_and_missing_file(evaluated, tmp_path):
    rows = evaluated[-1]
    source = Source(5, "calibrated")
    write_results(rows, tmp_path / "run", source)
    assert read_results(tmp_path / "run") == rows
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.recorded_source(run_dir.results_json) == source
    with open(run_dir.results_csv, newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == list(RESULT_FIELDS)
    # the CSV rounds to 7 significant digits, the JSON keeps every digit
    errors = [float(line["top1_error"]) for line in table]
    assert errors == pytest.approx([row["top1_error"] for row in rows], rel=5e-7, abs=0)
    with pytest.raises(FileNotFoundError, match=r"results\.json"):
        read_results(tmp_path / "missing")


def test_plot_writes_png(evaluated, tmp_path):
    path = tmp_path / "plots" / "cost_error.png"
    cascade = {"cascade": [(0.005, 80.0), (0.004, 90.0)]}
    plot_cost_error(evaluated[-1], path, title="wrn-10-1", extra_curves=cascade)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


# ------------------------------------------------------------------------- selection


def row(point: int, ratio: float, gflops: float, error: float, mode: str = "instance") -> dict:
    return {"point": point, "ratio": ratio, "gflops": gflops, "top1_error": error, "bn_mode": mode}


ROWS = [
    row(0, 1.0, 10.0, 20.0),
    row(1, 0.75, 6.0, 32.0),  # same cost as (2, 0.5), worse: dropped
    row(1, 0.5, 4.0, 30.0),
    row(2, 0.5, 6.0, 25.0),
    row(2, 0.75, 8.0, 25.0),  # no better than the cheaper (2, 0.5): dropped
    row(0, 1.0, 10.0, 22.0, "uniform"),
    row(1, 0.5, 4.0, 40.0, "uniform"),
]
LATENCY = [
    {"point": p, "ratio": r, "batch": batch, "median_ms": ms * batch / 64}
    for batch in (1, 64)
    for (p, r), ms in {
        (0, 1.0): 50.0,
        (1, 0.5): 20.0,
        (1, 0.75): 30.0,
        (2, 0.5): 35.0,
        (2, 0.75): 33.0,  # faster than (2, 0.5) at the same error: on the latency front
    }.items()
]


def test_pareto_front_drops_dominated_rows_and_worse_ties():
    front = pareto_front([r for r in ROWS if r["bn_mode"] == "instance"])
    assert [(r["point"], r["ratio"]) for r in front] == [(1, 0.5), (2, 0.5), (0, 1.0)]


@pytest.mark.parametrize(
    ("budget", "mode", "expected"),
    [
        (4.0, "instance", (1, 0.5)),
        (7.0, "instance", (2, 0.5)),
        (9.9, "instance", (2, 0.5)),
        (10.0, "instance", (0, 1.0)),
        (5.0, "uniform", (1, 0.5)),
    ],
)
def test_gflops_budget_picks_most_accurate_fitting_instance(budget, mode, expected):
    chosen = select_instance(ROWS, budget_gflops=budget, bn_mode=mode)
    assert (chosen["point"], chosen["ratio"], chosen["bn_mode"]) == (*expected, mode)


def test_no_fitting_instance_names_budget_and_cheapest_cost():
    with pytest.raises(ValueError, match=r"budget of 3\.5 GFLOPs; the cheapest available costs 4 "):
        select_instance(ROWS, budget_gflops=3.5)
    with pytest.raises(ValueError, match=r"budget of 19 ms; the cheapest available costs 20 ms"):
        select_instance(ROWS, budget_ms=19, latency_rows=LATENCY, batch=64)


def test_latency_budget_joins_on_instance_and_batch():
    chosen = select_instance(ROWS, budget_ms=34.0, latency_rows=LATENCY, batch=64)
    assert (chosen["point"], chosen["ratio"], chosen["batch"]) == (2, 0.75, 64)
    assert chosen["median_ms"] == 33.0
    single_batch = [r for r in LATENCY if r["batch"] == 1]
    chosen = select_instance(ROWS, budget_ms=0.8, latency_rows=single_batch)
    assert (chosen["point"], chosen["ratio"], chosen["batch"]) == (0, 1.0, 1)


def test_latency_budget_takes_the_fastest_compiler_options_of_an_instance():
    named = [{**row, "compiler_options": "single-convolution"} for row in LATENCY]
    faster = [
        {**row, "compiler_options": "xla-default", "median_ms": row["median_ms"] - 2.0}
        for row in LATENCY
        if row["batch"] == 64
    ]
    chosen = select_instance(ROWS, budget_ms=34.0, latency_rows=named + faster, batch=64)
    assert chosen["median_ms"] == 31.0 and (chosen["point"], chosen["ratio"]) == (2, 0.75)
    with pytest.raises(ValueError, match=r"two latency rows .* compiler options 'xla-default'"):
        select_instance(ROWS, budget_ms=34.0, latency_rows=faster + faster, batch=64)


def test_budget_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one of budget_gflops and budget_ms"):
        select_instance(ROWS, budget_gflops=5.0, budget_ms=10.0, latency_rows=LATENCY)
    with pytest.raises(ValueError, match="exactly one of budget_gflops and budget_ms"):
        select_instance(ROWS)
    with pytest.raises(ValueError, match=r"batch sizes \[1, 64\]; pass batch="):
        select_instance(ROWS, budget_ms=34.0, latency_rows=LATENCY)
    with pytest.raises(ValueError, match=r"no latency rows for batch 8; measured batch sizes"):
        select_instance(ROWS, budget_ms=34.0, latency_rows=LATENCY, batch=8)
    with pytest.raises(ValueError, match=r"no latency at batch 64 for instances .*\[\(0, 1\.0\)\]"):
        select_instance(ROWS, budget_ms=34.0, latency_rows=LATENCY[6:], batch=64)
    with pytest.raises(ValueError, match="budget_ms needs latency_rows"):
        select_instance(ROWS, budget_ms=34.0)
    with pytest.raises(ValueError, match=r"no rows with bn_mode 'ubn'.*\['instance', 'uniform'\]"):
        select_instance(ROWS, budget_gflops=5.0, bn_mode="ubn")
