"""Compile time of the train-step programs: one by one, in parallel, from a warm cache.

The train steps of the chosen instances (``--instances``; default all ``2N + 1``, which
must include the full network) of the target (built as training builds them: each key's
gradient program plus the parameter-update program they share,
:class:`sdpoint_jax.training.loop.TrainPrograms`) are compiled four times, each time in a fresh
Python process, so that no run profits from another's in-memory state (JAX's
persistent-cache setting is fixed per process once used; XLA may keep process-wide
tuning results):

1. ``one_by_one``: one step after the other, each timed, persistent cache disabled;
   the full instance, compiled first (with the update program), gives the cost of one
   train step;
2. ``parallel``: ``TrainPrograms.precompile(workers=W)``, writing into a new, empty
   persistent compilation cache and executable cache (cold);
3. ``warm_cache``: the same again in a new process, served by JAX's persistent cache
   alone (every program is still traced and lowered);
4. ``warm_executables``: the same again, served by the executable cache
   (:class:`sdpoint_jax.training.programs.ExecutableCache`), as a resumed or repeated training
   run is.

``--phases`` runs a subset: ``one_by_one`` always (it gives the one-program reference and
every program's cold time, with the total); the warm runs need ``parallel`` (they read
its caches). ``--phases one_by_one`` is the cold compile of every instance at half the
cost of all four.

Times are wall-clock seconds from the first program to the last (tracing, lowering and
compiling or loading), after the backend has started. The caches are in a temporary
directory removed at the end.

``compile_bench.json``: ``model``, ``dataset``, ``dtype``, ``conv_lowering``,
``cpu_optimization_level``, ``device_kind``,
``platform``, ``jax_version``, ``cpu_model``, ``host_memory``, ``host_memory_source``,
``batch``, ``workers``, ``programs`` (the number of instances, ``2N + 1`` for all),
``one_program_s`` (the full instance), ``program_s`` (instance -> seconds, one by one),
``phases`` (one object per run: ``name``, ``workers``, ``cache`` (``off``, ``cold``,
``warm`` or ``executables``), ``seconds``, ``cache_hits``, ``cache_writes`` (XLA programs
read from or written to JAX's cache: a gradient program per instance and the update
program), ``freed`` (gradient programs freed to stay under the process's memory-map cap,
:mod:`sdpoint_jax.xla_cpu.memory_maps`; each is compiled once all the same))
and ``parallel_over_one`` (parallel seconds / one program's seconds; null without the
``parallel`` run).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from absl import flags
from tqdm.auto import tqdm

from sdpoint_jax.bench import options, report
from sdpoint_jax.bench.train_steps import TrainSteps
from sdpoint_jax.cli import UsageError
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.training.programs import default_compile_workers, enable_compilation_cache

T = TypeVar("T")

CACHE_HITS = "/jax/compilation_cache/cache_hits"
CACHE_WRITES = "/jax/compilation_cache/cache_misses"  # recorded when an entry is written

COLUMNS = (
    report.Column("run", "name"),
    report.Column("workers", "workers"),
    report.Column("cache", "cache"),
    report.Column("programs", "programs"),
    report.Column("seconds", "seconds", ".2f"),
    report.Column("x one program", "of_one", ".2f"),
    report.Column("cache hits", "cache_hits"),
    report.Column("cache writes", "cache_writes"),
    report.Column("freed", "freed"),
)


DEFAULT_BATCH_SIZE = 128
PHASES = ("one_by_one", "parallel", "warm_cache", "warm_executables")


def define_flags(flag_values: flags.FlagValues) -> None:
    """The flags of this command alone (``--batch`` is shared: :mod:`.options`)."""
    flags.DEFINE_string(
        "phases",
        "all",
        f"the runs: 'all' or a comma list out of {', '.join(PHASES)}; one_by_one always "
        "runs, and the warm runs need parallel",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "workers",
        default_compile_workers(),
        "parallel compile threads; the default is one per CPU core, at most 8",
        lower_bound=1,
        flag_values=flag_values,
    )


def run_isolated(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a fresh (spawned) Python process; returns its result.

    ``function`` and ``args`` must be picklable (module-level function, plain data).
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """Compiling the train-step programs of ``instances`` of ``target`` at ``batch_size``.

    Attributes:
      workers: compile threads (``InstancePrograms.precompile``); ``None`` compiles one
        program after the other on the calling thread and times each.
      cache_dir: persistent compilation cache directory; ``None`` disables the cache.
      keep_executables: also use the executable cache beside ``cache_dir``.
    """

    target: options.Target
    instances: tuple[Instance, ...]
    batch_size: int
    workers: int | None
    cache_dir: str | None
    keep_executables: bool = False


def compile_all(job: CompileJob) -> dict[str, Any]:
    """Runs ``job`` in this (fresh) process: ``seconds`` in all, ``program_s`` (one by
    one only), persistent-cache ``cache_hits`` and ``cache_writes``, gradient programs
    ``freed`` for the memory-map budget, and its ``environment`` (the device)."""
    if job.cache_dir is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        enable_compilation_cache(job.cache_dir)
    model = job.target.create_model()
    programs = TrainSteps.create(
        job.target, model, job.batch_size, abstract=True, keep_executables=job.keep_executables
    ).programs
    jax.block_until_ready(jnp.zeros(()) + 1)  # start the backend before timing
    events = Counter()
    jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))
    program_s = {}
    start = time.perf_counter()
    if job.workers is None:
        for instance in tqdm(job.instances, desc="compiling one by one", unit="program"):
            program_start = time.perf_counter()
            programs[instance]  # compiles it
            program_s[str(instance)] = time.perf_counter() - program_start
    else:
        programs.precompile(job.instances, workers=job.workers)
    return {
        "seconds": time.perf_counter() - start,
        "program_s": program_s,
        "cache_hits": events[CACHE_HITS],
        "cache_writes": events[CACHE_WRITES],
        "freed": programs.gradients.freed,
        "environment": report.environment(),
    }


def parse_phases(text: str) -> tuple[str, ...]:
    """``--phases``: ``all`` or a comma list of :data:`PHASES`, which must hold
    ``one_by_one``, and ``parallel`` where it holds a warm run; returned in run order."""
    names = PHASES if text == "all" else tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in PHASES]
    if unknown:
        raise UsageError(f"--phases {text}: unknown {', '.join(unknown)}; choose from {PHASES}")
    if "one_by_one" not in names:
        raise UsageError(f"--phases {text}: include one_by_one, the one-program reference")
    warm = [name for name in names if name.startswith("warm_")]
    if warm and "parallel" not in names:
        raise UsageError(f"--phases {text}: {', '.join(warm)} read the caches parallel writes")
    return tuple(name for name in PHASES if name in names)


def benchmark(
    target: options.Target,
    instances: Sequence[Instance],
    batch_size: int,
    workers: int,
    phases: Sequence[str] = PHASES,
) -> dict[str, Any]:
    """The runs ``phases`` (see :func:`parse_phases`; ``compile_bench.json``'s content);
    ``instances`` include the full network."""
    if Instance.full() not in instances:
        raise UsageError(
            f"--instances {','.join(map(str, instances))}: include full, whose compile time "
            "is the one-program reference"
        )
    chosen = tuple(instances)
    with tempfile.TemporaryDirectory(prefix="sdpoint_jax_bench_cache_") as root:
        cache_dir = str(Path(root) / "xla")  # executables go beside it, also in root
        keeping = CompileJob(target, chosen, batch_size, workers, cache_dir, keep_executables=True)
        jobs = {
            "one_by_one": ("off", CompileJob(target, chosen, batch_size, None, None)),
            "parallel": ("cold", keeping),
            "warm_cache": ("warm", CompileJob(target, chosen, batch_size, workers, cache_dir)),
            "warm_executables": ("executables", keeping),
        }
        results = {}
        for name, (cache, job) in jobs.items():
            if name not in phases:
                continue
            tqdm.write(f"{name}: {job.workers or 1} worker(s), persistent cache {cache}")
            results[name] = run_isolated(compile_all, job)
    one_program_s = results["one_by_one"]["program_s"][str(Instance.full())]
    phase_results = [
        {
            "name": name,
            "workers": jobs[name][1].workers or 1,
            "cache": jobs[name][0],
            **{key: result[key] for key in ("seconds", "cache_hits", "cache_writes", "freed")},
        }
        for name, result in results.items()
    ]
    return {
        **target.fields(),
        **results["one_by_one"]["environment"],
        "batch": batch_size,
        "workers": workers,
        "programs": len(chosen),
        "one_program_s": one_program_s,
        "program_s": results["one_by_one"]["program_s"],
        "phases": phase_results,
        "parallel_over_one": (
            results["parallel"]["seconds"] / one_program_s if "parallel" in results else None
        ),
    }


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """Measures, writes ``compile_bench.json``, prints the table; returns the result."""
    target, model = options.target_from_flags(flag_values)
    batch_size = options.batch_size(flag_values, "compile", DEFAULT_BATCH_SIZE)
    instances = options.instances(flag_values, model)
    phases = parse_phases(flag_values.phases)
    result = benchmark(target, instances, batch_size, flag_values.workers, phases)
    path = report.write_json(Path(flag_values.out) / "compile_bench.json", result)
    one = result["one_program_s"]
    table = [
        {"name": "one program (full)", "workers": 1, "cache": "off", "programs": 1, "seconds": one}
    ] + [{**phase, "programs": result["programs"]} for phase in result["phases"]]
    print(
        f"{target.model_name} on {target.dataset}, {target.dtype}, batch {batch_size}: compiling "
        f"{result['programs']} train-step programs on {result['device_kind']}"
    )
    print(report.host_line(result))
    print(report.format_table([{**row, "of_one": row["seconds"] / one} for row in table], COLUMNS))
    print(f"wrote {path}")
    return result
