"""Input pipeline throughput: decoded and augmented training images per second, per core.

Reads ``--dataset``'s training split (``--split``) from ``--data-dir`` with the training pipeline
itself (:func:`sdpoint_jax.data.pipeline.train_batches`: tf.data with autotuned
parallel decoding and augmentation, e.g. ImageNet's JPEG decode-and-crop, resize to
224 and flip, then normalisation and batching, prefetched), and places every batch on
the devices as training does (:func:`sdpoint_jax.training.parallel.shard_batches`,
which keeps batches in flight ahead of the consumer). ``--warmup`` batches run untimed
(tf.data's autotuning settles, a split that fits in the shuffle buffer is read into
memory), then ``--steps`` batches of ``--batch`` images are timed until the last one
is on the devices. Nothing else runs: the figure is what the host's cores feed.

``input_bench.json``: ``dataset``, ``data_dir``, ``split``, ``batch``, ``steps``, ``cores`` (CPU
cores this process may run on), ``seconds``, ``images_per_s``,
``images_per_s_per_core``, ``device_kind``, ``cpu_model``, ``platform``, ``jax_version``,
``host_memory``, ``host_memory_source``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from pathlib import Path
from typing import Any

import jax
from absl import flags

from sdpoint_jax.bench import options, report
from sdpoint_jax.training import parallel

COLUMNS = (
    report.Column("dataset", "dataset"),
    report.Column("batch", "batch"),
    report.Column("cores", "cores"),
    report.Column("img/s", "images_per_s", ".1f"),
    report.Column("img/s per core", "images_per_s_per_core", ".1f"),
)


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("data-dir", None, "tensorflow-datasets data directory", **define)
    flags.DEFINE_string(
        "split", None, "training split read (default: the data set's, e.g. train)", **define
    )


def measure(
    dataset: str,
    data_dir: str | None,
    split: str | None,
    batch_size: int,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """Times ``steps`` batches of ``split`` after ``warmup`` (see the module docstring)."""
    from sdpoint_jax.data import pipeline

    mesh = parallel.create_mesh()
    parallel.check_batch_size(batch_size, mesh)
    batches = pipeline.train_batches(
        dataset, global_batch_size=batch_size, seed=0, data_dir=data_dir, train_split=split
    )
    with contextlib.closing(batches):  # an abandoned tf.data iterator is slow to collect
        placed = parallel.shard_batches(batches, mesh)
        for batch in itertools.islice(placed, warmup):
            jax.block_until_ready(batch)
        start = time.perf_counter()
        for batch in itertools.islice(placed, steps):
            jax.block_until_ready(batch)
        seconds = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    images_per_s = steps * batch_size / seconds
    return {
        "dataset": dataset,
        "data_dir": data_dir,
        "split": split or pipeline.dataset_spec(dataset).train_split,
        "batch": batch_size,
        "steps": steps,
        "cores": cores,
        "seconds": seconds,
        "images_per_s": images_per_s,
        "images_per_s_per_core": images_per_s / cores,
        **report.environment(),
    }


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """``python -m sdpoint_jax.bench input ...``: measures, prints, writes the JSON."""
    result = measure(
        flag_values.dataset,
        flag_values["data-dir"].value,
        flag_values.split,
        options.batch_size(flag_values, "input", default=128),
        flag_values.steps,
        flag_values.warmup,
    )
    print(f"{result['cpu_model']}, {result['cores']} cores")
    print(report.format_table([result], COLUMNS))
    path = report.write_json(Path(flag_values.out) / "input_bench.json", result)
    print(f"wrote {path}")
    return result
