"""``bench train --host-memory=MODES``: the train benchmark once per host memory mode.

Which host memory mode (:mod:`sdpoint_jax.xla_cpu.host_memory`) makes training fastest
depends on the machine, so this measures it: the whole ``bench train`` measurement
runs in a child process per mode, started in that mode (the same command without
``--host-memory``, ``--rounds`` and ``--record``, writing its ``train_bench.json`` to a
temporary directory). With ``--rounds N`` the modes alternate (A, B, C, A, B, C, ...)
so that drifts of a shared machine hit all of them alike, and each figure is the median
over the rounds: full step ms, SDPoint mix step ms, mix over full (the median of each
round's ratio), the mix's FLOPs expectation (mean FLOPs over its drawn instances,
``drawn_flops_fraction``; the same in every round) and mix over full divided by it.
``--record`` stores the mode with the fastest mix step as this machine's choice for
``auto`` (:func:`sdpoint_jax.xla_cpu.host_memory.write_record`).

``train_bench_host_memory.json``: ``model``, ``dataset``, ``dtype``, ``conv_lowering``,
``cpu_optimization_level``, ``batch``, ``steps``, ``rounds``, ``cpu_model``,
``kernel_release``, ``glibc``,
``modes`` (one object per mode, in the order given: ``host_memory``, ``rounds``,
``full_step_ms``, ``mix_step_ms``, ``mix_over_full``, ``flops_expectation``,
``mix_over_expectation``), ``fastest`` (the mode with the fastest mix step),
``record`` (the record's path, or null) and ``runs`` (mode -> each round's
``train_bench.json``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import flags

import sdpoint_jax
from sdpoint_jax import machine
from sdpoint_jax.bench import options, report
from sdpoint_jax.cli import UsageError
from sdpoint_jax.errors import ProcessFailedError
from sdpoint_jax.xla_cpu import host_memory

OWN_FLAGS = ("host-memory", "rounds", "record", "out")
"""Flags of the comparison itself, not passed on to the measuring children."""
COLUMNS = (
    report.Column("host memory", "host_memory"),
    report.Column("rounds", "rounds"),
    report.Column("full step ms", "full_step_ms", ".2f"),
    report.Column("mix step ms", "mix_step_ms", ".2f"),
    report.Column("mix / full", "mix_over_full", ".1%"),
    report.Column("FLOPs expectation", "flops_expectation", ".1%"),
    report.Column("mix / expectation", "mix_over_expectation", ".3f"),
)


def define_flags(flag_values: flags.FlagValues) -> None:
    """``--host-memory``, ``--rounds`` and ``--record``."""
    define = {"flag_values": flag_values}
    flags.DEFINE_string(
        "host-memory",
        None,
        "measure once per host memory mode, each in a child process started in it: a "
        f"comma list out of {', '.join(host_memory.CONCRETE_MODES)}, or all (every mode "
        "available here)",
        **define,
    )
    flags.DEFINE_integer(
        "rounds", 1, "with --host-memory: rounds over the modes", lower_bound=1, **define
    )
    flags.DEFINE_boolean(
        "record",
        False,
        "with --host-memory: record the mode with the fastest SDPoint mix as this "
        "machine's choice for host memory auto",
        **define,
    )


def parse_modes(text: str, available: Sequence[str]) -> list[str]:
    """The modes of ``--host-memory`` (``all``: every one of ``available``), repeats
    dropped; a :class:`UsageError` naming the bad one and the allowed ones."""
    allowed = f"{', '.join(host_memory.CONCRETE_MODES)} or all"
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError(f"--host-memory: expected a comma list out of {allowed}, got {text!r}")
    modes = []
    for name in names:
        if name == "all":
            modes += available
        elif name not in host_memory.CONCRETE_MODES:
            raise UsageError(f"--host-memory: unknown mode {name!r}; choose from {allowed}")
        elif name not in available:
            raise UsageError(
                f"--host-memory: {name} is not available on this machine (available: "
                f"{', '.join(available)})"
            )
        else:
            modes.append(name)
    return list(dict.fromkeys(modes))


def requested_modes(flag_values: flags.FlagValues) -> list[str] | None:
    """The ``--host-memory`` modes, None without the flag; ``--rounds`` or ``--record``
    without it is a usage error."""
    text = flag_values["host-memory"].value
    if text is None:
        for name in ("rounds", "record"):
            if flag_values[name].present:
                raise UsageError(f"--{name} needs --host-memory")
        return None
    return parse_modes(text, host_memory.available_modes())


def child_command(flag_values: flags.FlagValues, out: Path) -> list[str]:
    """This ``bench train`` command without :data:`OWN_FLAGS`, writing to ``out``."""
    passed = [
        flag_values[name].serialize()
        for name in flag_values
        if flag_values[name].name == name and flag_values[name].present and name not in OWN_FLAGS
    ]
    return [sys.executable, "-m", "sdpoint_jax.bench", "train", *passed, f"--out={out}"]


def child_environment(mode: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``environ`` as it starts (:func:`~sdpoint_jax.xla_cpu.host_memory.default_environment`)
    set up for ``mode``, naming it in ``SDPOINT_JAX_HOST_MEMORY`` (so the child does not
    restart into another), with this package importable."""
    environ = host_memory.environment_for(mode, host_memory.default_environment(environ))
    package_root = str(Path(sdpoint_jax.__file__).resolve().parent.parent)
    paths = [package_root, *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**environ, host_memory.MODE_VARIABLE: mode, "PYTHONPATH": os.pathsep.join(paths)}


def measure_in(mode: str, command: Sequence[str], out: Path) -> dict[str, Any]:
    """Runs ``command`` (writing ``train_bench.json`` into ``out``) in host memory
    ``mode``; returns its result. The child's stderr (progress bars, errors) passes
    through."""
    done = subprocess.run(
        command, env=child_environment(mode), stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        last = " / ".join(done.stdout.strip().splitlines()[-3:])
        raise ProcessFailedError(
            f"bench train in host memory mode {mode} exited with status {done.returncode}"
            + (f": {last}" if last else "")
        )
    result = report.read_json(out / "train_bench.json")
    if result["host_memory"] != mode:
        raise ProcessFailedError(
            f"bench train started in host memory mode {mode} ran in {result['host_memory']}"
        )
    return result


def step_ms(result: Mapping[str, Any], name: str) -> float:
    """The step milliseconds of run ``name`` (``full``, ``mix``, ...) of a train result."""
    return next(run["step_ms"] for run in result["runs"] if run["name"] == name)


def summarize(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode of ``results`` (mode -> each round's ``train_bench.json``):
    medians over the rounds, as the module docstring says."""
    rows = []
    for mode, rounds in results.items():
        mix_over_full = statistics.median(r["mix_over_full_step_time"] for r in rounds)
        expectation = rounds[0]["drawn_flops_fraction"]
        rows.append(
            {
                "host_memory": mode,
                "rounds": len(rounds),
                "full_step_ms": statistics.median(step_ms(r, "full") for r in rounds),
                "mix_step_ms": statistics.median(step_ms(r, "mix") for r in rounds),
                "mix_over_full": mix_over_full,
                "flops_expectation": expectation,
                "mix_over_expectation": mix_over_full / expectation,
            }
        )
    return rows


def fastest(rows: Sequence[Mapping[str, Any]]) -> str:
    """The mode of the row with the fastest SDPoint mix step."""
    return min(rows, key=lambda row: row["mix_step_ms"])["host_memory"]


def run(
    flag_values: flags.FlagValues, target: options.Target, modes: Sequence[str]
) -> dict[str, Any]:
    """Measures every mode of ``target`` in turn for ``--rounds``, prints the combined
    table, writes ``train_bench_host_memory.json`` (and the record with ``--record``);
    returns it."""
    rounds = flag_values.rounds
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="sdpoint_jax_train_host_memory_") as temp:
        for index in range(rounds):
            for mode in modes:
                out = Path(temp) / f"{index}-{mode}"
                result = measure_in(mode, child_command(flag_values, out), out)
                results[mode].append(result)
                print(
                    f"round {index + 1}/{rounds}, {mode}: full {step_ms(result, 'full'):.2f} "
                    f"ms, mix {step_ms(result, 'mix'):.2f} ms per step",
                    flush=True,
                )
    rows = summarize(results)
    first = results[modes[0]][0]
    combined = {
        **target.fields(),
        "batch": first["batch"],
        "steps": first["steps"],
        "rounds": rounds,
        **machine.identity(),
        "modes": rows,
        "fastest": fastest(rows),
        "record": None,
        "runs": results,
    }
    if flag_values.record:
        figures = {key: combined[key] for key in ("model", "dataset", "batch", "steps", "rounds")}
        combined["record"] = str(
            host_memory.write_record(combined["fastest"], {**figures, "modes": rows})
        )
    path = report.write_json(Path(flag_values.out) / "train_bench_host_memory.json", combined)
    print(
        f"{combined['model']} on {combined['dataset']}, {combined['dtype']}, batch "
        f"{combined['batch']}, {combined['steps']} steps per run, {rounds} round(s) per mode, "
        f"{first['device_kind']}:"
    )
    print(
        f"CPU: {combined['cpu_model']}; kernel {combined['kernel_release']}; "
        f"glibc {combined['glibc'] or '-'}"
    )
    print(report.format_table(rows, COLUMNS))
    print(f"fastest SDPoint mix step: {combined['fastest']}")
    if combined["record"]:
        print(f"recorded {combined['fastest']} for host memory auto: {combined['record']}")
    print(f"wrote {path}")
    return combined
