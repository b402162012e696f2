"""The compiled programs a server runs, and their latency table.

At start-up every exported instance is compiled for every batch bucket
(:func:`sdpoint_jax.serve.controller.buckets`), so no request waits for a compilation.
Each program maps images ``(bucket, H, W, 3)`` 0-255 RGB to float32 softmax
probabilities ``(bucket, classes)``.

The latency of each (instance, bucket) is read from a ``latency.json`` of
:mod:`sdpoint_jax.bench.latency` (its rows of this model and this device kind;
``p90_ms``), and the program is compiled with the inference compiler options of that
row (``compiler_options``; a table that timed several sets gives the fastest), so that
the table describes the program that runs. Rows written before tables named their
options were timed with the default set (``single-convolution``). Every program runs
once at start-up, so that no request pays for a program's first run, which is slower
than the later ones. Programs the file does not list are compiled with the engine's own
option set and measured: ``repeats`` rounds that each run every unlisted program once,
and per program the 90th percentile of its runs. Interleaving the programs spreads a
passing disturbance of the machine over all of them, rather than charging it to the
one being timed.

Every compile runs inside the process's memory-map budget
(:mod:`sdpoint_jax.xla_cpu.memory_maps`): a server keeps all its programs, so where the
next one would pass Linux's cap it stops with :class:`MemoryMapLimitError` naming the
programs it needs, instead of dying inside XLA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdpoint_jax.deploy.loader import ExportedModel
from sdpoint_jax.errors import MemoryMapLimitError
from sdpoint_jax.serve.controller import Level, buckets
from sdpoint_jax.xla_cpu.compiler_options import (
    check_inference_option_set,
    inference_compiler_options,
    timed_option_set,
)
from sdpoint_jax.xla_cpu.memory_maps import MapBudget, process_budget

LATENCY_QUANTILE = 90
"""The percentile of one batch's latency the controller plans with."""

ENGINE_OPTION_SET = "xla-default"
"""The inference compiler options of programs the latency table does not list: at the
batch sizes a loaded server runs, XLA's big fusions are the faster (WRN-16-1 full
network at batch 64: 50 ms against 78 ms with single-convolution fusions)."""


def table_latencies(
    path: str | Path, model: str, device_kind: str, names: Sequence[str]
) -> dict[tuple[str, int], tuple[float, str]]:
    """``{(instance, batch): (p90_ms, option set)}`` of the rows of ``latency.json`` at
    ``path`` for ``model`` on ``device_kind`` and one of ``names``; of several option
    sets, the one of the lowest ``p90_ms``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no latency table at {path}")
    fastest: dict[tuple[str, int], tuple[float, str]] = {}
    for row in json.loads(path.read_text()):
        if not (
            row.get("model") == model
            and row.get("device_kind") == device_kind
            and row["instance"] in names
        ):
            continue
        option_set = timed_option_set(row)
        try:
            check_inference_option_set(option_set)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        key = (row["instance"], int(row["batch"]))
        timed = (float(row["p90_ms"]), option_set)
        fastest[key] = min(fastest.get(key, timed), timed)
    return fastest


class Engine:
    """Compiled programs of every instance of ``exported`` at every bucket up to
    ``max_batch``, the latency table and the controller's levels.

    Args:
      exported: the export directory, loaded.
      max_batch: the largest batch (a power of two).
      latency_file: a ``latency.json`` to read latencies and compiler options from
        (``None``: measure all).
      repeats: timed runs per program where a latency is measured.
      option_set: inference compiler options of the programs the table does not list.
      map_budget: the memory-map budget to compile in (default: the process's).
    """

    def __init__(
        self,
        exported: ExportedModel,
        max_batch: int,
        *,
        latency_file: str | Path | None = None,
        repeats: int = 10,
        option_set: str = ENGINE_OPTION_SET,
        map_budget: MapBudget | None = None,
    ) -> None:
        self.exported = exported
        self.max_batch = max_batch
        self.buckets = buckets(max_batch)
        self.input_shape = tuple(exported.manifest["input"]["shape"][1:])
        entries = {entry["name"]: entry for entry in exported.manifest["instances"]}
        self.levels = tuple(
            Level(name, float(entries[name]["gflops"]), entries[name]["top1_error"])
            for name in exported.instances
        )
        check_inference_option_set(option_set)
        known: dict[tuple[str, int], tuple[float, str]] = {}
        if latency_file is not None:
            known = table_latencies(
                latency_file,
                exported.manifest["model"],
                jax.devices()[0].device_kind,
                exported.instances,
            )
        keys = [(name, bucket) for name in exported.instances for bucket in self.buckets]
        self.compiler_options = {key: known[key][1] if key in known else option_set for key in keys}
        budget = process_budget() if map_budget is None else map_budget
        try:
            self._programs = {}
            for key in keys:
                with budget.compiling():
                    self._programs[key] = self._compile(*key, self.compiler_options[key])
        except MemoryMapLimitError as err:
            raise MemoryMapLimitError(
                f"compiled {len(self._programs)} of the {len(keys)} programs this server "
                f"needs ({len(exported.instances)} instance(s) x {len(self.buckets)} batch "
                f"sizes), and the next does not fit: {err} Or serve fewer instances or a "
                "smaller --max-batch."
            ) from None
        zeros = {
            bucket: np.zeros((bucket, *self.input_shape), np.float32) for bucket in self.buckets
        }
        for name, bucket in keys:  # the first run of each, before any request
            self._programs[name, bucket](zeros[bucket]).block_until_ready()
        self.latency_source = {key: "table" if key in known else "measured" for key in keys}
        measured = self._measure([key for key in keys if key not in known], zeros, repeats)
        latencies = {**measured, **{key: ms for key, (ms, _) in known.items()}}
        self.latency_ms = {key: latencies[key] for key in keys}

    def _compile(self, name: str, bucket: int, option_set: str) -> Any:
        function = self.exported.function(name)

        def probabilities(images: jax.Array) -> jax.Array:
            return jax.nn.softmax(function.call(images), axis=-1)

        spec = jax.ShapeDtypeStruct((bucket, *self.input_shape), jnp.float32)
        options = inference_compiler_options(option_set=option_set)
        return jax.jit(probabilities, compiler_options=options).lower(spec).compile()

    def _measure(
        self, keys: Sequence[tuple[str, int]], inputs: dict[int, np.ndarray], repeats: int
    ) -> dict[tuple[str, int], float]:
        """The 90th-percentile latency (ms) of each program of ``keys`` on ``inputs`` (one
        batch per bucket), timed in ``repeats`` interleaved rounds (module docstring)."""
        times: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
        for _ in range(repeats):
            for key in keys:
                start = time.perf_counter()
                self._programs[key](inputs[key[1]]).block_until_ready()
                times[key].append(1e3 * (time.perf_counter() - start))
        return {key: float(np.percentile(times[key], LATENCY_QUANTILE)) for key in keys}

    def level(self, name: str) -> Level:
        return next(level for level in self.levels if level.name == name)

    def run(self, name: str, images: np.ndarray, bucket: int) -> np.ndarray:
        """Probabilities ``(n, classes)`` of ``images`` ``(n, H, W, 3)``, ``n <=
        bucket``, through ``name``'s program for ``bucket`` (zero-padded)."""
        padded = np.zeros((bucket, *self.input_shape), np.float32)
        padded[: len(images)] = images
        return np.asarray(self._programs[name, bucket](padded))[: len(images)]
