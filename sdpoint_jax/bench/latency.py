"""Inference latency of SDPoint instances, and whether it follows their FLOPs.

For every batch size, set of inference compiler options
(:data:`sdpoint_jax.xla_cpu.compiler_options.INFERENCE_OPTION_SETS`; ``--compiler-options``,
default ``single-convolution``) and instance, the eval forward pass (``train=False``) is
compiled ahead of time, run ``warmup`` times, then timed ``repeats`` times, each run ended
by ``block_until_ready``. Variables are zeros (:mod:`sdpoint_jax.bench.values`): latency
does not depend on their values. Rows are written to ``latency.json`` (the latency
table that ``sdpoint_jax.main select --budget-ms`` reads) and plotted against GFLOPs
to ``latency_vs_flops.png``; the console shows a table and, per batch size and option
set, how well latency is ordered like FLOPs (Spearman rank correlation, and the pairs of instances
where the one with fewer FLOPs is more than 5% slower).

Row fields: ``model``, ``dataset``, ``dtype``, ``device_kind``, ``platform``,
``jax_version``, ``cpu_model``, ``host_memory``, ``host_memory_source``, ``instance``
(e.g. ``"3:0.5"``), ``point``, ``ratio``, ``batch``, ``compiler_options`` (the name of
the option set; the server compiles each program with the fastest set its table has),
``gflops`` (analytic, per image), ``xla_gflops`` (XLA's cost analysis of the compiled
program, per batch; ``null`` where the backend has none), ``compile_s`` (lower and
compile, seconds), ``repeats``, ``warmup``, ``median_ms``, ``p10_ms``, ``p90_ms`` (per
batch, milliseconds), ``images_per_s`` (``batch / median``) and
``achieved_gflops_per_s`` (analytic GFLOPs x ``batch / median``).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from sdpoint_jax.bench import options, report
from sdpoint_jax.bench.values import zeros_like
from sdpoint_jax.cli import UsageError
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.models.cost import abstract_variables, count_flops
from sdpoint_jax.training.run_dir import RunDir
from sdpoint_jax.xla_cpu import memory_maps
from sdpoint_jax.xla_cpu.compiler_options import (
    DEFAULT_INFERENCE_OPTION_SET,
    INFERENCE_OPTION_SETS,
    check_inference_option_set,
    inference_compiler_options,
)

Row = dict[str, Any]

SLOWER_TOLERANCE = 0.05
"""A cheaper instance counts as out of order when its median is this fraction slower."""

COLUMNS = (
    report.Column("instance", "instance"),
    report.Column("batch", "batch"),
    report.Column("options", "compiler_options"),
    report.Column("GFLOPs/img", "gflops", ".4f"),
    report.Column("XLA GFLOPs/batch", "xla_gflops", ".3f"),
    report.Column("compile s", "compile_s", ".2f"),
    report.Column("median ms", "median_ms", ".3f"),
    report.Column("p10 ms", "p10_ms", ".3f"),
    report.Column("p90 ms", "p90_ms", ".3f"),
    report.Column("img/s", "images_per_s", ".1f"),
    report.Column("GFLOP/s", "achieved_gflops_per_s", ".2f"),
)


DEFAULT_BATCH_SIZES = (1, 32, 128)


def define_flags(flag_values: flags.FlagValues) -> None:
    """The flags of this command alone (``--batch`` is shared: :mod:`.options`)."""
    define = {"flag_values": flag_values}
    flags.DEFINE_integer("repeats", 20, "timed runs per program", lower_bound=1, **define)
    flags.DEFINE_integer("warmup", 3, "untimed runs first", lower_bound=0, **define)
    flags.DEFINE_list(
        "compiler-options",
        [DEFAULT_INFERENCE_OPTION_SET],
        f"inference compiler option sets to time, of {sorted(INFERENCE_OPTION_SETS)}",
        **define,
    )


def _xla_gflops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of the whole compiled program by XLA's cost analysis, in GFLOPs, if known."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # one entry per program in older versions
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return None if flops is None else float(flops) / 1e9


def measure(
    model: SDPointModel,
    variables: Any,
    images: jax.Array,
    instance: Instance,
    *,
    repeats: int,
    warmup: int,
    option_set: str = DEFAULT_INFERENCE_OPTION_SET,
) -> Row:
    """Compile time, XLA FLOPs and latency percentiles of one instance on ``images``,
    compiled with the inference compiler options named ``option_set``."""
    forward = jax.jit(
        functools.partial(model.apply, instance=instance, train=False),
        compiler_options=inference_compiler_options(option_set=option_set),
    )
    with memory_maps.process_budget().compiling():  # a program past vm.max_map_count: a clear error
        start = time.perf_counter()
        compiled = forward.lower(variables, images).compile()
        compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(variables, images))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, images))
        seconds.append(time.perf_counter() - start)
    p10, median, p90 = np.percentile(np.asarray(seconds) * 1e3, [10, 50, 90])
    return {
        "xla_gflops": _xla_gflops(compiled),
        "compile_s": compile_s,
        "repeats": repeats,
        "warmup": warmup,
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
    }


def benchmark(
    target: options.Target,
    model: SDPointModel,
    instances: Sequence[Instance],
    batches: Sequence[int],
    *,
    repeats: int,
    warmup: int,
    option_sets: Sequence[str] = (DEFAULT_INFERENCE_OPTION_SET,),
) -> list[Row]:
    """One row per batch size, option set and instance (in that order of nesting,
    each in the given order)."""
    gflops = {inst: count_flops(model, inst, target.input_hw) / 1e9 for inst in instances}
    variables = jax.device_put(zeros_like(abstract_variables(model, target.input_hw)))
    common = {**target.fields(), **report.environment()}
    rng = np.random.default_rng(0)
    rows = []
    programs = list(itertools.product(batches, option_sets, instances))
    with tqdm(total=len(programs), desc="latency", unit="program") as bar:
        for batch in batches:
            images = jax.device_put(rng.standard_normal((batch, *target.input_hw, 3), np.float32))
            for option_set, inst in itertools.product(option_sets, instances):
                bar.set_postfix(batch=batch, options=option_set, instance=str(inst))
                timing = measure(
                    model,
                    variables,
                    images,
                    inst,
                    repeats=repeats,
                    warmup=warmup,
                    option_set=option_set,
                )
                seconds = timing["median_ms"] / 1e3
                rows.append(
                    {
                        **common,
                        "instance": str(inst),
                        "point": inst.point,
                        "ratio": inst.ratio,
                        "batch": batch,
                        "compiler_options": option_set,
                        "gflops": gflops[inst],
                        **timing,
                        "images_per_s": batch / seconds,
                        "achieved_gflops_per_s": gflops[inst] * batch / seconds,
                    }
                )
                bar.update()
    return rows


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 0, tied values sharing their mean rank."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation of ``x`` and ``y``; ``None`` when either is constant."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def out_of_order(rows: Sequence[Row], tolerance: float = SLOWER_TOLERANCE) -> list[tuple[Row, Row]]:
    """Pairs ``(cheap, costly)`` of rows of one batch size where ``cheap`` has fewer
    analytic FLOPs but a median latency more than ``tolerance`` above ``costly``'s."""
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        cheap, costly = sorted((a, b), key=lambda row: row["gflops"])
        slower = cheap["median_ms"] > (1 + tolerance) * costly["median_ms"]
        if cheap["gflops"] < costly["gflops"] and slower:
            pairs.append((cheap, costly))
    return pairs


def by_series(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows grouped by batch size and option set (``"batch 32, xla-default"``), in order
    of first appearance."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(f"batch {row['batch']}, {row['compiler_options']}", []).append(row)
    return groups


def format_order(rows: Sequence[Row]) -> str:
    """Per batch size and option set: how well median latency is ordered like FLOPs."""
    lines = []
    for series, same in by_series(rows).items():
        rho = spearman([r["gflops"] for r in same], [r["median_ms"] for r in same])
        rho_text = "n/a (needs two instances of different cost)" if rho is None else f"{rho:.3f}"
        lines.append(f"{series}: Spearman rank correlation of latency with FLOPs {rho_text}")
        pairs = out_of_order(same)
        lines.append(
            f"  {len(pairs)} pair(s) where fewer FLOPs run > {SLOWER_TOLERANCE:.0%} slower"
            + (":" if pairs else "")
        )
        lines += [
            f"    {cheap['instance']} ({cheap['gflops']:.4f} GFLOPs, {cheap['median_ms']:.3f} ms)"
            f" vs {costly['instance']} ({costly['gflops']:.4f} GFLOPs, "
            f"{costly['median_ms']:.3f} ms)"
            for cheap, costly in pairs
        ]
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Median latency (ms, log scale) against GFLOPs per image, one series per batch size
    and option set."""
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for series, group in by_series(rows).items():
        same = sorted(group, key=lambda row: row["gflops"])
        axes.plot(
            [row["gflops"] for row in same],
            [row["median_ms"] for row in same],
            marker="o",
            markersize=4,
            linewidth=1,
            label=series,
        )
    axes.set_yscale("log")
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel("median latency per batch (ms)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def run(flag_values: flags.FlagValues) -> list[Row]:
    """Measures, writes ``latency.json`` and the plot, prints the tables; returns the rows."""
    target, model = options.target_from_flags(flag_values)
    instances = options.instances(flag_values, model)
    batches = options.batch_sizes(flag_values, DEFAULT_BATCH_SIZES)
    option_sets = flag_values["compiler-options"].value
    if not option_sets:
        raise UsageError(
            f"--compiler-options names no option set; choose from {sorted(INFERENCE_OPTION_SETS)}"
        )
    try:
        for name in option_sets:
            check_inference_option_set(name)
    except ValueError as err:
        raise UsageError(f"--compiler-options: {err}") from None
    rows = benchmark(
        target,
        model,
        instances,
        batches,
        repeats=flag_values.repeats,
        warmup=flag_values.warmup,
        option_sets=option_sets,
    )
    out = Path(flag_values.out)
    json_path = report.write_json(RunDir(out).latency_json, rows)
    device = rows[0]["device_kind"]
    png_path = plot(rows, out / "latency_vs_flops.png", f"{target.model_name} ({device})")
    print(f"{target.model_name} on {target.dataset}, {target.dtype}, {device}:")
    print(report.host_line(rows[0]))
    print(report.format_table(rows, COLUMNS))
    print(format_order(rows))
    print(f"wrote {json_path} and {png_path}")
    return rows
