"""Training throughput: full network, cheapest instance, the SDPoint mix, low mode.

Runs of ``steps`` jitted train steps on one random batch (real optimizer, state
donated from step to step, as in training): every step the full instance; every step
the instance with the fewest analytic FLOPs; the SDPoint mix, step ``s`` running
``draw_instance(space, seed=0, step=s, sdpoint=True)`` as training does; and, for
architectures with a low mode (:mod:`sdpoint_jax.core.lowmode`), every step the full
instance in low mode (``LowMode()``: ratio 2, Gaussian input downsampling). Every
program is compiled and run once before any timing. A run is timed from its first
dispatch to its final state being ready, so host dispatch overlaps device work as in
training.

The mix's speed-up is compared with its FLOPs: the mean over the drawn instances of
``FLOPs / full FLOPs``, and its expectation under the paper's uniform draw. FLOPs are
forward-pass FLOPs; a train step costs about three forward passes at every instance,
so the fractions carry over.

``train_bench.json``: ``model``, ``dataset``, ``dtype``, ``conv_lowering``,
``cpu_optimization_level``, ``device_kind``, ``platform``,
``jax_version``, ``cpu_model``, ``host_memory``, ``host_memory_source``, ``batch``,
``steps``, ``runs`` (one object per run: ``name``
(``full``, ``cheapest``, ``mix``, and ``low`` where supported), ``draws`` (instance or
low mode, e.g. ``"low:2"`` -> steps), ``seconds``, ``step_ms``, ``images_per_s``,
``flops_fraction`` (mean FLOPs / full FLOPs over its steps; low mode counts its
downsampled convolutions, not the input downsampling)),
``mix_over_full_step_time``, ``drawn_flops_fraction``, ``uniform_flops_fraction``,
``back_to_back_step_ms`` (each instance the mix drew, run alone: one step, then
:data:`BACK_TO_BACK_STEPS` timed steps back to back; instance -> ms per step) and
``mix_over_back_to_back`` (the mix's time over the sum of its draws' back-to-back step
times: above 1, what switching programs costs; at 1, the mix costs what its instances
cost, and any excess over the FLOPs is in the programs themselves).

``--host-memory=MODES`` runs all of this once per host memory mode, each in a child
process started in it, and compares them (:mod:`sdpoint_jax.bench.train_host_memory`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sdpoint_jax.bench import options, report, train_host_memory
from sdpoint_jax.bench.train_steps import TrainSteps
from sdpoint_jax.cli import UsageError
from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.lowmode import LowMode
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.models.cost import count_flops, instance_costs
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import TrainState
from sdpoint_jax.training.schedules import ProgramKey, draw_instance

BACK_TO_BACK_STEPS = 2

COLUMNS = (
    report.Column("run", "name"),
    report.Column("instances", "instances"),
    report.Column("step ms", "step_ms", ".2f"),
    report.Column("img/s", "images_per_s", ".1f"),
    report.Column("FLOPs of full", "flops_fraction", ".1%"),
    report.Column("time of full", "time_fraction", ".1%"),
)


def define_flags(flag_values: flags.FlagValues) -> None:
    """The flags of this command alone (``--batch`` is shared: :mod:`.options`)."""
    flags.DEFINE_integer("steps", 20, "timed steps per run", lower_bound=1, flag_values=flag_values)
    train_host_memory.define_flags(flag_values)


def uniform_flops_fraction(space: InstanceSpace, flops: Mapping[Instance, int]) -> float:
    """Expected ``FLOPs / full FLOPs`` of one draw of :meth:`InstanceSpace.sample`:
    ``(1 + (1/|R|) sum_{p >= 1, r} F(p, r) / F_full) / (N + 1)``."""
    full = flops[Instance.full()]
    downsampled = sum(flops[inst] for inst in space if not inst.is_full) / len(space.ratios)
    return (1 + downsampled / full) / (space.num_points + 1)


def random_batch(mesh: Mesh, batch_size: int, image_size: int, num_classes: int) -> dict:
    """Normal images and uniform labels, sharded over the mesh."""
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
        "label": rng.integers(0, num_classes, batch_size, dtype=np.int32),
    }
    return parallel.shard_batch(batch, mesh)


def timed_run(
    steps: TrainSteps, state: TrainState, batch: dict, keys: Sequence[ProgramKey], name: str
) -> tuple[TrainState, float]:
    """Runs one train step per entry of ``keys`` (instances or low modes); returns the
    state and seconds."""
    start = time.perf_counter()
    for key in tqdm(keys, desc=name, unit="step", leave=False):
        state, _ = steps.programs[key](state, batch)
    jax.block_until_ready(state)
    return state, time.perf_counter() - start


def back_to_back_ms(
    steps: TrainSteps, state: TrainState, batch: dict, keys: Sequence[ProgramKey]
) -> tuple[TrainState, dict[str, float]]:
    """Each program of ``keys`` run alone: one step, then :data:`BACK_TO_BACK_STEPS`
    timed steps back to back; ``{key: ms per step}``."""
    times = {}
    for key in tqdm(keys, desc="each drawn instance back to back", unit="program", leave=False):
        state, _ = timed_run(steps, state, batch, [key], str(key))
        state, seconds = timed_run(steps, state, batch, [key] * BACK_TO_BACK_STEPS, str(key))
        times[str(key)] = seconds / BACK_TO_BACK_STEPS * 1e3
    return state, times


def benchmark(
    target: options.Target, model: SDPointModel, batch_size: int, num_steps: int
) -> dict[str, Any]:
    """The timed runs and the FLOPs expectations (``train_bench.json``'s content)."""
    costs = {cost.instance: cost.flops for cost in instance_costs(model, target.input_hw)}
    flops: dict[ProgramKey, int] = dict(costs)
    full = Instance.full()
    runs: dict[str, list[ProgramKey]] = {
        "full": [full] * num_steps,
        "cheapest": [min(costs, key=costs.get)] * num_steps,
        "mix": [draw_instance(model.space, 0, step, True) for step in range(num_steps)],
    }
    if model.supports_low_mode:
        low = LowMode()
        flops[low] = count_flops(model, full, target.input_hw, low_mode=low)
        runs["low"] = [low] * num_steps
    needed = list(dict.fromkeys(key for sequence in runs.values() for key in sequence))
    steps = TrainSteps.create(target, model, batch_size)
    steps.programs.precompile(needed)
    batch = random_batch(steps.mesh, batch_size, target.image_size, model.num_classes)
    state, _ = timed_run(steps, steps.state, batch, needed, "first run of each program")
    results = []
    for name, sequence in runs.items():
        state, seconds = timed_run(steps, state, batch, sequence, name)
        results.append(
            {
                "name": name,
                "draws": dict(Counter(str(key) for key in sequence)),
                "seconds": seconds,
                "step_ms": seconds / num_steps * 1e3,
                "images_per_s": num_steps * batch_size / seconds,
                "flops_fraction": float(np.mean([flops[key] / flops[full] for key in sequence])),
            }
        )
    state, alone_ms = back_to_back_ms(steps, state, batch, list(dict.fromkeys(runs["mix"])))
    by_name = {run["name"]: run for run in results}
    mix_alone_s = sum(alone_ms[str(key)] for key in runs["mix"]) / 1e3
    return {
        **target.fields(),
        **report.environment(),
        "batch": batch_size,
        "steps": num_steps,
        "runs": results,
        "mix_over_full_step_time": by_name["mix"]["seconds"] / by_name["full"]["seconds"],
        "drawn_flops_fraction": by_name["mix"]["flops_fraction"],
        "uniform_flops_fraction": uniform_flops_fraction(model.space, costs),
        "back_to_back_step_ms": alone_ms,
        "mix_over_back_to_back": by_name["mix"]["seconds"] / mix_alone_s,
    }


def _describe(draws: Mapping[str, int]) -> str:
    """``"3:0.5"`` (or ``"low:2"``) for a run of one program, else how many distinct
    ones were drawn."""
    return next(iter(draws)) if len(draws) == 1 else f"{len(draws)} distinct"


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """Measures, writes ``train_bench.json``, prints the table; returns the result. With
    ``--host-memory``, compares host memory modes instead (:mod:`.train_host_memory`)."""
    target, model = options.target_from_flags(flag_values)
    batch_size = options.batch_size(flag_values, "train")
    try:
        parallel.check_batch_size(batch_size, parallel.create_mesh())
    except ValueError as err:
        raise UsageError(f"--batch: {err}") from err
    modes = train_host_memory.requested_modes(flag_values)
    if modes is not None:
        return train_host_memory.run(flag_values, target, modes)
    steps = flag_values.steps
    result = benchmark(target, model, batch_size, steps)
    path = report.write_json(Path(flag_values.out) / "train_bench.json", result)
    full_seconds = result["runs"][0]["seconds"]
    table = [
        {
            **run,
            "instances": _describe(run["draws"]),
            "time_fraction": run["seconds"] / full_seconds,
        }
        for run in result["runs"]
    ]
    print(
        f"{target.model_name} on {target.dataset}, {target.dtype}, batch {batch_size}, "
        f"{steps} steps per run, {result['device_kind']}:"
    )
    print(report.host_line(result))
    print(report.format_table(table, COLUMNS))
    print(
        f"SDPoint mix: step time {result['mix_over_full_step_time']:.1%} of full; FLOPs "
        f"{result['drawn_flops_fraction']:.1%} of full over the drawn instances, "
        f"{result['uniform_flops_fraction']:.1%} expected under the uniform draw; "
        f"{result['mix_over_back_to_back']:.3f}x the time of its draws with each instance "
        "run back to back"
    )
    print(f"wrote {path}")
    return result
