"""Top-1/top-5 error and cost of SDPoint instances, under each batch-norm mode.

``bn_mode="instance"`` normalises every instance with its own statistics (SDPoint);
``"uniform"`` with the statistics shared by all instances (the paper's UBN baseline,
kept alongside the per-instance ones during training). One pass over the evaluation
batches evaluates every (bn mode, instance) pair; each pair is its own XLA program.

Results are rows (dicts) with the fields of :data:`RESULT_FIELDS`, written as
``results.csv`` and ``results.json`` by :func:`write_results`. CSV tables
(:func:`write_csv`) hold floats rounded to :data:`CSV_SIGNIFICANT_DIGITS` significant
digits; JSON files keep full precision.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.norm import check_bn_mode
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run_dir import RunDir, Source, write_rows_json
from sdpoint_jax.xla_cpu.compiler_options import inference_compiler_options
from sdpoint_jax.xla_cpu.memory_maps import FirstCalls

RESULT_FIELDS = (
    "point",
    "ratio",
    "gflops",
    "fraction",
    "top1_error",
    "top5_error",
    "bn_mode",
    "examples",
)
"""Fields of a result row: instance ``(point, ratio)``, GFLOPs per image and fraction of
the full network's FLOPs, top-1/top-5 error in percent, bn mode, number of examples."""

CSV_SIGNIFICANT_DIGITS = 7
"""Significant digits of a float in a CSV table: about what a float32 holds, which is
what the models compute in; more would be noise."""

BATCH_FIELDS = ("image", "label", "mask")

Row = dict[str, Any]


def _counts_fn(model: SDPointModel) -> Callable[..., jax.Array]:
    """Jitted ``(variables, batch, instance) -> int32 [3]``: top-1 hits, top-5 hits and
    real examples of one batch (examples with ``mask == 0`` count for nothing).

    An example is a top-k hit when its logits are all finite and fewer than ``k`` of them
    exceed its label's logit (so ties favour the label, and non-finite outputs miss).
    ``instance`` is static: one program per instance.
    """

    @functools.partial(
        jax.jit, static_argnames="instance", compiler_options=inference_compiler_options()
    )
    def counts(variables: Any, batch: dict[str, jax.Array], instance: Instance) -> jax.Array:
        logits = model.apply(variables, batch["image"], instance=instance, train=False)
        label_logit = jnp.take_along_axis(logits, batch["label"][:, None], axis=1)
        rank = jnp.sum(logits > label_logit, axis=1)
        real = batch["mask"] > 0
        scored = real & jnp.all(jnp.isfinite(logits), axis=1)
        return jnp.stack(
            [jnp.sum(scored & (rank < 1)), jnp.sum(scored & (rank < 5)), jnp.sum(real)]
        ).astype(jnp.int32)

    return counts


def _models_by_mode(model: SDPointModel, bn_modes: Sequence[str]) -> dict[str, SDPointModel]:
    """``model`` reading the statistics of each requested bn mode."""
    if not bn_modes:
        raise ValueError("bn_modes must name at least one of ('instance', 'uniform'), got none")
    for mode in bn_modes:
        check_bn_mode(mode)
    if model.bn_mode == "uniform" and "instance" in bn_modes:
        raise ValueError(
            "bn_mode 'instance' cannot be evaluated for a model trained with "
            "bn_mode='uniform' (it has no per-instance statistics); use bn_modes=('uniform',)"
        )
    return {mode: model.clone(bn_mode=mode) for mode in dict.fromkeys(bn_modes)}


def _check_batch(batch: dict[str, np.ndarray], input_hw: tuple[int, int]) -> None:
    missing = [name for name in BATCH_FIELDS if name not in batch]
    if missing:
        raise ValueError(f"evaluation batch lacks field(s) {missing}; needs {BATCH_FIELDS}")
    if tuple(batch["image"].shape[1:3]) != tuple(input_hw):
        raise ValueError(
            f"evaluation images are {batch['image'].shape[1]}x{batch['image'].shape[2]}, "
            f"but input_hw is {input_hw[0]}x{input_hw[1]}"
        )


def evaluate_instances(
    model: SDPointModel,
    variables: Any,
    batches: Iterable[dict[str, np.ndarray]],
    instances: Sequence[Instance],
    *,
    input_hw: tuple[int, int],
    bn_modes: Sequence[str] = ("instance", "uniform"),
    mesh: Mesh | None = None,
    progress: bool = False,
) -> list[Row]:
    """Error and cost of every instance under every bn mode, in one pass over ``batches``.

    Args:
      model: the trained model; its ``bn_mode`` is the one it was trained with.
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model``.
      batches: evaluation batches, read once: dicts with ``"image"`` float32
        ``(B, H, W, 3)``, ``"label"`` int ``(B,)`` and ``"mask"`` float ``(B,)``
        (padding examples have ``mask == 0`` and are not counted). With ``mesh``
        these are this process's parts of global batches.
      instances: the instances to evaluate (each validated against the model).
      input_hw: image height and width, for the FLOPs count.
      bn_modes: statistics to evaluate with: ``"instance"`` (each instance's own) and/or
        ``"uniform"`` (UBN). A ``"uniform"``-mode model allows ``"uniform"`` only.
      mesh: if given, batches are split over its ``"data"`` axis, variables replicated.
      progress: show a progress bar over the batches.

    Returns:
      One row per (bn mode, instance), bn modes outermost, with the fields of
      :data:`RESULT_FIELDS`; errors are in percent of the real examples.

    Each (bn mode, instance) program compiles within the process's memory-map budget
    (:mod:`sdpoint_jax.xla_cpu.memory_maps`): train-step programs held in the process
    are freed first where it is short.

    Raises:
      ValueError: unknown or disallowed bn mode, an instance outside the model's space,
        a batch without the needed fields or of another size than ``input_hw``, or no
        real examples at all.
    """
    models = _models_by_mode(model, bn_modes)
    instances = list(dict.fromkeys(model.space.validate(instance) for instance in instances))
    count_fns = {mode: _counts_fn(mode_model) for mode, mode_model in models.items()}
    placed = variables if mesh is None else parallel.replicate(variables, mesh)
    totals: dict[tuple[str, Instance], jax.Array] = {}
    first_calls = FirstCalls()
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        _check_batch(batch, input_hw)
        if mesh is not None:
            parallel.check_batch_size(len(batch["image"]) * jax.process_count(), mesh)
        fields = {name: batch[name] for name in BATCH_FIELDS}
        placed_batch = fields if mesh is None else parallel.shard_batch(fields, mesh)
        for mode, counts in count_fns.items():
            for instance in instances:
                with first_calls((mode, instance, batch["image"].shape)):
                    hits = counts(placed, placed_batch, instance)
                key = (mode, instance)
                totals[key] = hits if key not in totals else totals[key] + hits

    flops = {instance: count_flops(model, instance, input_hw) for instance in instances}
    full_flops = count_flops(model, Instance.full(), input_hw)
    rows = []
    for (mode, instance), total in totals.items():
        top1, top5, examples = (int(value) for value in np.asarray(total))
        if not examples:
            raise ValueError("the evaluation batches hold no real examples (every mask is 0)")
        rows.append(
            {
                "point": instance.point,
                "ratio": instance.ratio,
                "gflops": flops[instance] / 1e9,
                "fraction": flops[instance] / full_flops,
                "top1_error": 100.0 * (1.0 - top1 / examples),
                "top5_error": 100.0 * (1.0 - top5 / examples),
                "bn_mode": mode,
                "examples": examples,
            }
        )
    if not rows:
        raise ValueError("no evaluation results: got no batches or no instances")
    return rows


def csv_value(value: Any) -> Any:
    """``value`` as :func:`write_csv` writes it: a float (Python or NumPy) rounded to
    :data:`CSV_SIGNIFICANT_DIGITS` significant digits, in its shortest form
    (``41.559999999999995`` -> ``"41.56"``, ``1/3`` -> ``"0.3333333"``, non-finite
    floats as ``"nan"``/``"inf"``); anything else unchanged."""
    if not isinstance(value, float | np.floating):
        return value
    return repr(float(format(float(value), f".{CSV_SIGNIFICANT_DIGITS}g")))


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    """Writes ``rows`` as a CSV table to ``path`` (columns: the rows' keys in first-seen
    order; missing values empty; floats rounded by :func:`csv_value`), creating its
    directory if needed."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(field for row in rows for field in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows({name: csv_value(value) for name, value in row.items()} for row in rows)


def write_results(rows: Sequence[Row], directory: str | Path, source: Source) -> None:
    """Writes ``rows``, computed from ``source``, to the run directory's ``results.csv``
    and ``results.json`` (:func:`sdpoint_jax.training.run_dir.write_rows_json`).

    Columns are the fields of the rows in first-seen order; the directory is created
    if needed.
    """
    if not rows:
        raise ValueError("no result rows to write")
    run_dir = RunDir(directory)
    write_csv(rows, run_dir.results_csv)
    write_rows_json(run_dir.results_json, rows, source)
