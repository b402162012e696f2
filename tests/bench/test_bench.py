"""Benchmark commands: JSON schemas, plot, FLOPs expectations, ordering checks, bad input."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from sdpoint_jax import machine
from sdpoint_jax.bench import latency
from sdpoint_jax.bench.__main__ import main
from sdpoint_jax.bench.train import uniform_flops_fraction
from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.lowmode import LowMode
from sdpoint_jax.evaluation.selection import select_instance
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.xla_cpu import host_memory
from tests.conftest import SHARED_DATA_DIR, needs_cifar10

pytestmark = pytest.mark.first

TINY = ["--model", "wrn-10-1", "--dataset", "cifar10"]
ENVIRONMENT = {
    "model": str,
    "dataset": str,
    "dtype": str,
    "device_kind": str,
    "platform": str,
    "cpu_model": str,
    "host_memory": str,
    "host_memory_source": str,
}


@pytest.fixture(scope="module")
def tiny_model():
    return create("wrn-10-1", num_classes=10)


def _check_types(row: dict, types: dict) -> None:
    for key, kind in types.items():
        assert isinstance(row[key], kind), (key, row[key])


def test_latency_rows_plot_and_select(tmp_path, tiny_model):
    option_sets = ("xla-default", "single-convolution")
    argv = ["latency", *TINY, "--batch", "2", "--repeats", "2", "--warmup", "1"]
    argv += ["--compiler-options", ",".join(option_sets)]
    rows = main([*argv, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "latency.json").read_text()) == rows
    assert (tmp_path / "latency_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = [(2, s, str(inst)) for s in option_sets for inst in tiny_model.space]
    assert [(row["batch"], row["compiler_options"], row["instance"]) for row in rows] == expected
    for row in rows:
        _check_types(row, ENVIRONMENT)
        _check_types(row, {"point": int, "ratio": float, "batch": int, "repeats": int})
        assert row["model"] == "wrn-10-1" and row["dtype"] == "float32"
        assert row["xla_gflops"] is None or row["xla_gflops"] > 0
        for key in ("gflops", "compile_s", "median_ms", "p10_ms", "p90_ms", "images_per_s"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        inst = Instance.parse(row["instance"])
        assert (row["point"], row["ratio"]) == (inst.point, inst.ratio)
        assert row["gflops"] == count_flops(tiny_model, inst, (32, 32)) / 1e9
        assert row["achieved_gflops_per_s"] == pytest.approx(
            row["gflops"] * row["batch"] / row["median_ms"] * 1e3
        )
    # the table is what `select --budget-ms` reads
    error = {"full": 5.0}  # the most accurate, the others 10%
    evaluated = [
        {**row, "top1_error": error.get(row["instance"], 10.0), "bn_mode": "instance"}
        for row in rows
    ]
    chosen = select_instance(evaluated, budget_ms=1e6, latency_rows=rows, batch=2)
    assert chosen["instance"] == "full"  # at the faster of its option sets
    assert chosen["median_ms"] == min(r["median_ms"] for r in rows if r["instance"] == "full")


def test_train_runs_and_flops_fractions(tmp_path, tiny_model, capsys):
    result = main(["train", *TINY, "--batch", "4", "--steps", "3", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "train_bench.json").read_text()) == result
    _check_types(result, ENVIRONMENT)
    assert result["cpu_model"] == machine.cpu_model()
    assert result["host_memory"] == host_memory.active_mode()
    assert result["host_memory_source"] in host_memory.SOURCES
    header = f"CPU: {result['cpu_model']}; host memory: {result['host_memory']} ("
    out = capsys.readouterr().out
    assert header in out
    assert (result["batch"], result["steps"]) == (4, 3)
    runs = {run["name"]: run for run in result["runs"]}
    assert list(runs) == ["full", "cheapest", "mix", "low"]
    flops = {str(inst): count_flops(tiny_model, inst, (32, 32)) for inst in tiny_model.space}
    low = LowMode()
    flops[str(low)] = count_flops(tiny_model, Instance.full(), (32, 32), low_mode=low)
    for run in runs.values():
        assert sum(run["draws"].values()) == 3
        assert run["seconds"] > 0 and run["step_ms"] > 0 and run["images_per_s"] > 0
        draws = [name for name, n in run["draws"].items() for _ in range(n)]
        mean = sum(flops[name] for name in draws) / len(draws) / flops["full"]
        assert run["flops_fraction"] == pytest.approx(mean)
    assert runs["full"]["draws"] == {"full": 3}
    assert runs["low"]["draws"] == {"low:2": 3}
    assert 0 < runs["low"]["flops_fraction"] < 0.25  # 16x16 maps, 1x1 block kernels
    (cheapest,) = runs["cheapest"]["draws"]
    assert flops[cheapest] == min(flops[str(inst)] for inst in tiny_model.space)
    assert runs["cheapest"]["flops_fraction"] < 1
    assert result["drawn_flops_fraction"] == runs["mix"]["flops_fraction"]
    assert result["mix_over_full_step_time"] == pytest.approx(
        runs["mix"]["seconds"] / runs["full"]["seconds"]
    )
    by_instance = {inst: flops[str(inst)] for inst in tiny_model.space}
    assert result["uniform_flops_fraction"] == uniform_flops_fraction(tiny_model.space, by_instance)
    # each instance the mix drew, timed alone; the mix against the sum over its draws
    alone = result["back_to_back_step_ms"]
    assert set(alone) == set(runs["mix"]["draws"]) and min(alone.values()) > 0
    mix_alone_s = sum(alone[name] * n for name, n in runs["mix"]["draws"].items()) / 1e3
    assert result["mix_over_back_to_back"] == pytest.approx(runs["mix"]["seconds"] / mix_alone_s)
    assert "x the time of its draws with each instance run back to back" in out


COMPILED = ("full", "1:0.5")  # two of the model's instances: the phases, at a third of the cost


def test_compile_phases_cold_and_warm(tmp_path):
    instances = ["--instances", ",".join(COMPILED)]
    argv = ["compile", *TINY, *instances, "--batch", "2", "--workers", "2", "--out", str(tmp_path)]
    result = main(argv)
    assert json.loads((tmp_path / "compile_bench.json").read_text()) == result
    _check_types(result, ENVIRONMENT)
    programs = len(COMPILED)
    assert result["programs"] == programs
    assert set(result["program_s"]) == set(COMPILED)
    assert all(seconds > 0 for seconds in result["program_s"].values())
    assert result["one_program_s"] == result["program_s"]["full"]
    phases = {phase["name"]: phase for phase in result["phases"]}
    assert list(phases) == ["one_by_one", "parallel", "warm_cache", "warm_executables"]
    assert all(phase["seconds"] > 0 for phase in phases.values())
    assert phases["one_by_one"]["seconds"] >= sum(result["program_s"].values())
    # cold runs compile everything (a gradient program per instance and the update
    # program); the warm run loads every program from the cache
    xla_programs = programs + 1
    assert (phases["one_by_one"]["cache_hits"], phases["one_by_one"]["cache_writes"]) == (0, 0)
    assert (phases["parallel"]["cache_hits"], phases["parallel"]["cache_writes"]) == (
        0,
        xla_programs,
    )
    assert (phases["warm_cache"]["cache_hits"], phases["warm_cache"]["cache_writes"]) == (
        xla_programs,
        0,
    )
    # loaded executables never reach JAX's cache: nothing is lowered or compiled
    warm_executables = phases["warm_executables"]
    assert (warm_executables["cache_hits"], warm_executables["cache_writes"]) == (0, 0)
    assert all(phase["freed"] == 0 for phase in phases.values())  # far under the map cap
    assert result["parallel_over_one"] == pytest.approx(
        phases["parallel"]["seconds"] / result["one_program_s"]
    )


def test_compile_one_by_one_alone(tmp_path):
    """``--phases one_by_one``: every program's cold time and their total, nothing
    else."""
    argv = ["compile", *TINY, "--instances", "full", "--batch", "2", "--out", str(tmp_path)]
    result = main([*argv, "--phases", "one_by_one"])
    assert [phase["name"] for phase in result["phases"]] == ["one_by_one"]
    assert set(result["program_s"]) == {"full"} and result["parallel_over_one"] is None


def test_uniform_flops_fraction_is_the_expectation_of_a_draw():
    space = InstanceSpace(3, (0.5, 0.75))
    flops = {inst: 1000 if inst.is_full else 100 * inst.point + 400 * inst.ratio for inst in space}
    # p uniform over 0..N, r uniform over R, p = 0 meaning the full network
    exact = sum(
        flops[Instance(p, r) if p else Instance.full()] / 1000
        for p, r in itertools.product(range(4), space.ratios)
    ) / (4 * len(space.ratios))
    assert uniform_flops_fraction(space, flops) == pytest.approx(exact)


def _rows(pairs):
    return [{"instance": f"i{i}", "gflops": g, "median_ms": m} for i, (g, m) in enumerate(pairs)]


def test_latency_order_checks():
    ordered = _rows([(1.0, 1.0), (2.0, 2.0), (3.0, 2.5)])
    assert latency.spearman([r["gflops"] for r in ordered], [r["median_ms"] for r in ordered]) == 1
    assert latency.out_of_order(ordered) == []
    # i0 is cheaper than i1 but 10% slower; i2 vs i1 is within the 5% tolerance
    rows = _rows([(1.0, 2.2), (2.0, 2.0), (3.0, 1.95)])
    assert [(a["instance"], b["instance"]) for a, b in latency.out_of_order(rows)] == [
        ("i0", "i1"),
        ("i0", "i2"),
    ]
    assert latency.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert latency.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # tied ranks
    assert latency.spearman([1, 2], [5, 5]) is None
    assert latency.out_of_order(_rows([(1.0, 3.0), (1.0, 1.0)])) == []  # equal FLOPs


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["latency", *TINY, "--instances", "full,9:0.5"], "instance point 9 is out of range"),
        (["latency", *TINY, "--instances", "2:0.3"], "ratio 0.3 is not one of"),
        (["latency", *TINY, "--instances", "2-0.5"], "cannot parse instance '2-0.5'"),
        (["latency", *TINY, "--batch", "1,0"], "every batch size must be >= 1, got 0"),
        (["latency", *TINY, "--batch", "1,x"], "got 'x'"),
        (
            ["latency", *TINY, "--compiler-options", "xla-default,fast"],
            "--compiler-options: unknown inference compiler options 'fast'; choose from",
        ),
        (["latency", *TINY, "--compiler-options", ""], "--compiler-options names no option set"),
        (["latency", *TINY, "--repeats", "0"], "flag --repeats=0: 0 is not a positive integer"),
        (["latency", *TINY, "--warmup", "-1"], "flag --warmup=-1: -1 is not a non-negative"),
        (["latency", *TINY, "--dtype", "float16"], "flag --dtype=float16: value should be one of"),
        (["latency", "--model", "wrn-x", "--dataset", "cifar10"], "unknown model 'wrn-x'"),
        (["latency", "--dataset", "cifar10"], "latency needs --model"),
        (["train", *TINY, "--batch", "0"], "flag --batch=0: every batch size must be >= 1, got 0"),
        (["train", *TINY], "train needs --batch"),
        (["train", *TINY, "--batch", "4,8"], "--batch: train takes one batch size, got 4,8"),
        (
            ["train", *TINY, "--batch", "4", "--steps", "-1"],
            "flag --steps=-1: -1 is not a positive",
        ),
        (["train", *TINY, "--batch", "4", "--repeats", "2"], "--repeats applies to latency only"),
        (
            ["compile", *TINY, "--compiler-options", "xla-default"],
            "--compiler-options applies to latency only, not to compile",
        ),
        (["compile", *TINY, "--workers", "0"], "flag --workers=0: 0 is not a positive integer"),
        (["compile", *TINY, "--instances", "1:0.5,2:0.5"], "--instances 1:0.5,2:0.5: include full"),
        (["compile", *TINY, "--instances", "4:0.5"], "instance point 4 is out of range"),
        (["compile", *TINY, "--phases", "parallel"], "--phases parallel: include one_by_one"),
        (
            ["compile", *TINY, "--phases", "one_by_one,warm_cache"],
            "warm_cache read the caches parallel writes",
        ),
        (["compile", *TINY, "--phases", "one_by_one,cold"], "unknown cold; choose from"),
        (["train", *TINY, "--batch", "4", "--phases", "all"], "--phases applies to compile only"),
        (
            ["train", *TINY, "--batch", "4", "--instances", "full"],
            "--instances applies to latency and compile only",
        ),
        (
            ["compile", *TINY, "--steps", "2"],
            "--steps applies to train and input only, not to compile",
        ),
        (["compile", *TINY, "--dataset", "mnist"], "flag --dataset=mnist: value should be one of"),
        ([*TINY], "give one command out of latency, train, compile, input; got none"),
        (["speed", *TINY], "give one command out of latency, train, compile, input; got speed"),
    ],
)
def test_bad_input_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert error.startswith("error: ") and error.count("\n") == 1, error  # one line
    assert "python -m sdpoint_jax.bench" in error and "--help" in error
    if "--dtype" in argv:
        assert "<float32|bfloat16>" in error  # the allowed values
    if "--dataset" in argv and "mnist" in argv:
        assert "<cifar10|cifar100|imagenet2012>" in error


@needs_cifar10
def test_input_bench_times_the_training_pipeline(tmp_path, capsys):
    argv = ["input", "--dataset", "cifar10", "--data-dir", str(SHARED_DATA_DIR)]
    argv += ["--split", "train[:64]", "--batch", "16", "--steps", "6", "--warmup", "2"]
    result = main([*argv, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "input_bench.json").read_text()) == result
    assert result["split"] == "train[:64]" and (result["batch"], result["steps"]) == (16, 6)
    assert result["cores"] == len(os.sched_getaffinity(0))
    assert result["images_per_s"] == pytest.approx(6 * 16 / result["seconds"])
    assert result["images_per_s_per_core"] == pytest.approx(
        result["images_per_s"] / result["cores"]
    )
    assert result["cpu_model"] and result["platform"] == "cpu"
    assert f"{result['cores']} cores" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["input", "--model", "wrn-10-1"], "--model applies to latency and train and compile"),
        (["latency", "--split", "train"], "--split applies to input only"),
    ],
)
def test_input_and_model_flags_belong_to_their_commands(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
