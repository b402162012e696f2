"""Exports trained SDPoint instances as self-contained ``jax.export`` artifacts.

``python -m sdpoint_jax.export --workdir RUN --instances full,3:0.5 --out DIR``
writes, for every chosen instance, one serialised function (StableHLO; the batch
dimension symbolic, so any batch size runs) with the parameters and that instance's
batch-norm statistics baked in as constants, plus ``switchable.jaxexport``: one
function ``(images, level)`` that runs ``instances[level]`` through ``lax.switch``, so
a server changes the cost per request without loading anything else. Instances are
ordered by FLOPs, cheapest first (level 0). :mod:`sdpoint_jax.deploy.loader` runs the
directory with ``jax`` alone.

Every function takes images ``(B, H, W, 3)`` float32 RGB in 0-255 pixel units and
applies the data set's normalisation ``(image - mean) / std`` itself; it returns
float32 logits ``(B, num_classes)``. The state is the one evaluation uses
(:func:`sdpoint_jax.training.run.restore_for_evaluation`: the calibrated statistics if
they are of the latest training step, else the training checkpoint's running averages).

``DIR/manifest.json``::

    {"format": "sdpoint_jax.deploy.artifacts/1", "model", "dataset", "num_classes", "step",
     "statistics" ("calibrated" or "running-average"), "bn_mode", "platforms",
     "input": {"shape": [null, H, W, 3], "dtype": "float32", "layout": "NHWC",
               "channels": "RGB", "pixel_range": [0, 255], "mean", "std",
               "normalisation": "(image - mean) / std, inside every function"},
     "output": {"shape": [null, num_classes], "dtype": "float32", "values": "logits"},
     "instances": [{"name", "point", "ratio", "gflops", "fraction",
                    "top1_error", "top5_error", "evaluated_examples", "file"}, ...],
     "switchable": {"file", "levels": [names, cheapest first]}}

The errors come from the run's ``results.json`` (``evaluate``) when it records the
exported step and statistics; otherwise (also for a ``results.json`` of an earlier
version, which records neither) they are ``null`` and a one-line note says why. The
directory is written next to ``DIR`` and renamed into place once complete; an existing
``DIR`` is never overwritten.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data.specs import DatasetSpec, dataset_spec
from sdpoint_jax.deploy.loader import FORMAT, MANIFEST
from sdpoint_jax.deploy.platforms import DEFAULT_PLATFORMS
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training.checkpoint import CheckpointManager
from sdpoint_jax.training.run_dir import RunDir, Source

SWITCHABLE_FILE = "switchable.jaxexport"

LogitsFn = Callable[[jax.Array], jax.Array]


def inference_function(
    model: SDPointModel, variables: Any, instance: Instance, spec: DatasetSpec
) -> LogitsFn:
    """``images (B, H, W, 3)`` 0-255 RGB -> float32 logits ``(B, classes)`` of
    ``instance``, normalising as the data pipeline does; ``variables`` are closed over
    (so only the statistics this instance reads end up in the traced program)."""
    mean, std = jnp.asarray(spec.mean, jnp.float32), jnp.asarray(spec.std, jnp.float32)

    def logits(images: jax.Array) -> jax.Array:
        return model.apply(variables, (images - mean) / std, instance=instance, train=False)

    return logits


def _export(
    function: Callable[..., jax.Array],
    spec: DatasetSpec,
    platforms: Sequence[str],
    *extra_args: jax.ShapeDtypeStruct,
) -> jax.export.Exported:
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, spec.image_size, spec.image_size, 3), jnp.float32)
    return jax.export.export(jax.jit(function), platforms=tuple(platforms))(images, *extra_args)


def export_instance(
    model: SDPointModel,
    variables: Any,
    instance: Instance,
    spec: DatasetSpec,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
    """One instance as a ``jax.export.Exported`` with a symbolic batch dimension."""
    model.space.validate(instance)
    return _export(inference_function(model, variables, instance, spec), spec, platforms)


def export_switchable(
    model: SDPointModel,
    variables: Any,
    instances: Sequence[Instance],
    spec: DatasetSpec,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
    """``(images, level: int32 scalar) -> logits`` of ``instances[level]`` (``lax.switch``;
    XLA clamps an out-of-range level, so callers check it: :mod:`sdpoint_jax.deploy.loader`
    does)."""
    if not instances:
        raise ValueError("the switchable function needs at least one instance")
    branches = [
        inference_function(model, variables, model.space.validate(i), spec) for i in instances
    ]

    def switchable(images: jax.Array, level: jax.Array) -> jax.Array:
        return jax.lax.switch(level, branches, images)

    return _export(switchable, spec, platforms, jax.ShapeDtypeStruct((), jnp.int32))


def measured_errors(
    run_dir: RunDir, instances: Sequence[Instance], bn_mode: str, source: Source
) -> dict[Instance, dict[str, Any]]:
    """``{instance: {"top1_error", "top5_error", "evaluated_examples"}}`` from the run's
    ``results.json`` when it was computed from ``source``; else ``{}``, with a one-line
    note saying why."""
    from sdpoint_jax.training.run_dir import read_results

    path = run_dir.results_json
    current = run_dir.is_current(path, source)
    if not current:
        if current is None:
            why = "records no step (an earlier version wrote it; run `evaluate` again)"
        elif not path.is_file():
            why = "does not exist"
        else:
            recorded = run_dir.recorded_source(path)
            why = f"is of step {recorded.step} with {recorded.statistics} statistics"
        print(
            f"note: {path} {why}, the export is of step {source.step} with "
            f"{source.statistics} statistics: errors left null"
        )
        return {}
    rows = {
        Instance(r["point"], r["ratio"]): r
        for r in read_results(run_dir.path)
        if r["bn_mode"] == bn_mode
    }
    return {
        instance: {
            "top1_error": rows[instance]["top1_error"],
            "top5_error": rows[instance]["top5_error"],
            "evaluated_examples": rows[instance]["examples"],
        }
        for instance in instances
        if instance in rows
    }


def write_export(
    out: Path,
    model: SDPointModel,
    variables: Any,
    instances: Sequence[Instance],
    spec: DatasetSpec,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    info: dict[str, Any],
    errors: dict[Instance, dict[str, Any]],
) -> dict[str, Any]:
    """Exports ``instances`` (cheapest first) and the switchable function into ``out``
    with its manifest (``info`` adds top-level fields); returns the manifest.

    Raises:
      FileExistsError: ``out`` exists.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(
            f"{out} already exists; choose a new --out (exports are never overwritten)"
        )
    hw = (spec.image_size, spec.image_size)
    flops = {i: count_flops(model, model.space.validate(i), hw) for i in dict.fromkeys(instances)}
    ordered = sorted(flops, key=lambda i: (flops[i], str(i)))
    full_flops = count_flops(model, Instance.full(), hw)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    entries = []
    for instance in ordered:
        file = f"{instance.key}.jaxexport"
        exported = export_instance(model, variables, instance, spec, platforms)
        (partial / file).write_bytes(exported.serialize())
        entries.append(
            {
                "name": str(instance),
                "point": instance.point,
                "ratio": instance.ratio,
                "gflops": flops[instance] / 1e9,
                "fraction": flops[instance] / full_flops,
                **errors.get(
                    instance, {"top1_error": None, "top5_error": None, "evaluated_examples": None}
                ),
                "file": file,
            }
        )
        print(f"exported {instance} ({flops[instance] / 1e9:.4f} GFLOPs) -> {file}", flush=True)
    switchable = export_switchable(model, variables, ordered, spec, platforms)
    (partial / SWITCHABLE_FILE).write_bytes(switchable.serialize())
    manifest = {
        "format": FORMAT,
        **info,
        "platforms": list(platforms),
        "input": {
            "shape": [None, spec.image_size, spec.image_size, 3],
            "dtype": "float32",
            "layout": "NHWC",
            "channels": "RGB",
            "pixel_range": [0, 255],
            "mean": list(spec.mean),
            "std": list(spec.std),
            "normalisation": "(image - mean) / std, inside every function",
        },
        "output": {"shape": [None, model.num_classes], "dtype": "float32", "values": "logits"},
        "instances": entries,
        "switchable": {"file": SWITCHABLE_FILE, "levels": [str(i) for i in ordered]},
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    partial.rename(out)
    return manifest


def run_config(
    workdir: Path, config_spec: str | None, data_dir: str | None
) -> ml_collections.ConfigDict:
    """The config of the run in ``workdir``: the file ``config_spec`` if given, else the
    one saved with its latest training checkpoint."""
    from sdpoint_jax.config import config_from_saved, load_config

    if config_spec is not None:
        return load_config(config_spec, data_dir)
    checkpoints = RunDir(workdir).checkpoints
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"no trained run in {workdir}: {checkpoints} does not exist")
    with CheckpointManager(checkpoints) as manager:
        config = config_from_saved(manager.saved_config())
    if data_dir is not None:
        config.data.data_dir = data_dir
    return config


def export_run(
    workdir: str | Path,
    instances: str,
    out: str | Path,
    *,
    config: ml_collections.ConfigDict,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> dict[str, Any]:
    """Exports ``instances`` (``"all"`` or ``"full,3:0.5"``) of the run in ``workdir``."""
    from sdpoint_jax.training.run import restore_for_evaluation

    run, state, source = restore_for_evaluation(config, workdir)
    chosen = run.model.space.parse_list(instances)
    if not chosen:
        raise ValueError(f"no instances to export in {instances!r}")
    model = run.model  # exported without a lowering: XLA's convolutions, any platform
    print(
        f"exporting {len(chosen)} instance(s) of step {source.step} ({source.describe()}) "
        f"for {list(platforms)}"
    )
    variables = jax.device_get(state.variables)
    errors = measured_errors(run.run_dir, chosen, config.sdpoint.bn_mode, source)
    info = {
        "model": config.model.name,
        "dataset": config.data.dataset,
        "num_classes": model.num_classes,
        "step": source.step,
        "statistics": source.statistics,
        "bn_mode": config.sdpoint.bn_mode,
    }
    spec = dataset_spec(config.data.dataset)
    manifest = write_export(
        Path(out), model, variables, chosen, spec, platforms=platforms, info=info, errors=errors
    )
    print(f"wrote {out}: {len(chosen)} instance(s), switchable.jaxexport, manifest.json")
    return manifest
