"""``bench train --host-memory``: mode lists, the children's command and environment,
the combined table from per-mode results, and one end-to-end comparison."""

from __future__ import annotations

import json
import os
import sys

import pytest

from sdpoint_jax import cli, machine
from sdpoint_jax.bench import report, train_host_memory
from sdpoint_jax.bench.__main__ import PROGRAM, main
from sdpoint_jax.xla_cpu import host_memory

TINY = ["--model", "wrn-10-1", "--dataset", "cifar10"]


def test_modes_are_parsed_against_those_available():
    available = ("huge-pages", "default")
    assert train_host_memory.parse_modes("all", available) == ["huge-pages", "default"]
    assert train_host_memory.parse_modes(" default, huge-pages,default", available) == [
        "default",
        "huge-pages",
    ]
    assert train_host_memory.parse_modes("default,all", available) == ["default", "huge-pages"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--host-memory", "fast"],
            "--host-memory: unknown mode 'fast'; choose from tcmalloc, huge-pages, default or all",
        ),
        (
            ["--host-memory", "tcmalloc,default"],
            "--host-memory: tcmalloc is not available on this machine (available: huge-pages, "
            "default)",
        ),
        (["--host-memory", ","], "--host-memory: expected a comma list out of tcmalloc"),
        (["--rounds", "2"], "--rounds needs --host-memory"),
        (["--record"], "--record needs --host-memory"),
        (["--host-memory", "all", "--rounds", "0"], "flag --rounds=0: 0 is not a positive"),
    ],
)
def test_bad_host_memory_flags_are_usage_errors(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(host_memory, "available_modes", lambda: ("huge-pages", "default"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--batch", "4", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert error.startswith("error: ") and error.count("\n") == 1, error


def test_host_memory_flags_belong_to_train(capsys):
    with pytest.raises(SystemExit):
        main(["latency", *TINY, "--host-memory", "default"])
    assert "--host-memory applies to train only, not to latency" in capsys.readouterr().err


def test_children_run_the_same_command_in_their_mode(tmp_path):
    argv = ["train", *TINY, "--batch=8", "--steps=3", "--host-memory=all", "--rounds=2"]
    argv += ["--record", "--out", "elsewhere", "-v", "0"]
    flag_values = cli.define_flags(PROGRAM, argv)
    cli.parse(PROGRAM, flag_values, argv)
    command = train_host_memory.child_command(flag_values, tmp_path)
    assert command[:4] == [sys.executable, "-m", "sdpoint_jax.bench", "train"]
    assert sorted(command[4:]) == sorted(
        ["--model=wrn-10-1", "--dataset=cifar10", "--batch=8", "--steps=3", "--verbosity=0"]
        + [f"--out={tmp_path}"]
    )
    user = {"LD_PRELOAD": "libfoo.so", "PYTHONPATH": "/mine", "SDPOINT_JAX_HOST_MEMORY": "auto"}
    started = host_memory.environment_for("huge-pages", user)
    started[host_memory.SOURCE_VARIABLE] = "preference"
    environ = train_host_memory.child_environment("default", started)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(train_host_memory.__file__)))
    assert environ == {
        "LD_PRELOAD": "libfoo.so",
        "SDPOINT_JAX_HOST_MEMORY": "default",
        "PYTHONPATH": f"{os.path.dirname(package_root)}{os.pathsep}/mine",
    }
    huge = train_host_memory.child_environment("huge-pages", started)
    assert host_memory.active_mode(huge) == "huge-pages"
    assert huge["SDPOINT_JAX_HOST_MEMORY"] == "huge-pages"


def _result(full_ms: float, mix_ms: float, drawn: float = 0.8) -> dict:
    runs = [{"name": "full", "step_ms": full_ms}, {"name": "mix", "step_ms": mix_ms}]
    return {
        "runs": runs,
        "mix_over_full_step_time": mix_ms / full_ms,
        "drawn_flops_fraction": drawn,
    }


def test_the_combined_table_takes_medians_over_rounds():
    results = {
        "tcmalloc": [_result(100, 90), _result(104, 100), _result(90, 99)],
        "huge-pages": [_result(110, 95), _result(100, 88), _result(120, 80)],
    }
    rows = train_host_memory.summarize(results)
    assert rows == [
        {
            "host_memory": "tcmalloc",
            "rounds": 3,
            "full_step_ms": 100,
            "mix_step_ms": 99,
            "mix_over_full": 100 / 104,  # median of 0.9, 0.9615, 1.1
            "flops_expectation": 0.8,
            "mix_over_expectation": pytest.approx(100 / 104 / 0.8),
        },
        {
            "host_memory": "huge-pages",
            "rounds": 3,
            "full_step_ms": 110,
            "mix_step_ms": 88,
            "mix_over_full": 95 / 110,  # median of 0.8636, 0.88, 0.6667
            "flops_expectation": 0.8,
            "mix_over_expectation": pytest.approx(95 / 110 / 0.8),
        },
    ]
    assert train_host_memory.fastest(rows) == "huge-pages"
    assert report.format_table(rows, train_host_memory.COLUMNS).splitlines() == [
        "host memory  rounds  full step ms  mix step ms  mix / full  FLOPs expectation  "
        "mix / expectation",
        "   tcmalloc       3        100.00        99.00       96.2%              80.0%  "
        "            1.202",
        " huge-pages       3        110.00        88.00       86.4%              80.0%  "
        "            1.080",
    ]


def test_rounds_alternate_the_modes_and_the_fastest_mix_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(host_memory, "available_modes", lambda: ("huge-pages", "default"))
    mix_ms = iter([50, 40, 60, 45, 55, 44])  # default, huge-pages, default, ...
    started = []

    def measure_in(mode, command, out):
        started.append((mode, out.name))
        return {
            **_result(100, next(mix_ms)),
            "host_memory": mode,
            "model": "wrn-10-1",
            "dataset": "cifar10",
            "dtype": "float32",
            "conv_lowering": "matmul_grad",
            "cpu_optimization_level": None,
            "batch": 4,
            "steps": 2,
            "device_kind": "cpu",
        }

    monkeypatch.setattr(train_host_memory, "measure_in", measure_in)
    argv = ["train", *TINY, "--batch=4", "--steps=2", "--host-memory=default,huge-pages"]
    result = main([*argv, "--rounds=3", "--record", f"--out={tmp_path}"])
    assert started == [
        (mode, f"{index}-{mode}") for index in range(3) for mode in ("default", "huge-pages")
    ]
    assert [(row["host_memory"], row["mix_step_ms"]) for row in result["modes"]] == [
        ("default", 55),
        ("huge-pages", 44),
    ]
    assert result["fastest"] == "huge-pages" == host_memory.read_record()["mode"]
    assert json.loads((tmp_path / "train_bench_host_memory.json").read_text()) == result


def test_end_to_end_a_child_runs_in_its_mode_and_the_fastest_is_recorded(
    tmp_path, monkeypatch, capsys, compilation_cache_dir
):
    # one real child, in a mode that changes malloc where the machine has one (several
    # modes alternated over rounds: test_rounds_alternate_the_modes_...)
    changing = [mode for mode in host_memory.available_modes() if mode != "default"]
    modes = changing[:1] or ["default"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the children compile into (and load from) the session's compilation cache
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache_dir))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    argv = ["train", *TINY, "--batch", "16", "--steps", "1", "--host-memory", ",".join(modes)]
    result = main([*argv, "--record", "--out", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "train_bench_host_memory.json").read_text())
    assert written == result
    assert [row["host_memory"] for row in result["modes"]] == list(result["runs"]) == modes
    assert {key: result[key] for key in machine.identity()} == machine.identity()
    for mode, (child,) in result["runs"].items():
        assert (child["host_memory"], child["host_memory_source"]) == (mode, "environment")
        assert child["cpu_model"] == machine.cpu_model()
        assert (child["model"], child["batch"], child["steps"]) == ("wrn-10-1", 16, 1)
    assert result["modes"] == train_host_memory.summarize(result["runs"])
    assert result["fastest"] == train_host_memory.fastest(result["modes"])
    record = host_memory.read_record()
    assert result["record"] == str(host_memory.record_path())
    assert record["mode"] == result["fastest"] and record["figures"]["modes"] == result["modes"]
    assert host_memory.recorded_mode() == result["fastest"]
    out = capsys.readouterr().out
    assert f"CPU: {machine.cpu_model()}; kernel " in out
    assert f"fastest SDPoint mix step: {result['fastest']}" in out
