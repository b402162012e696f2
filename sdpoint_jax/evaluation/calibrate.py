"""Instance-specific batch-norm calibration: exact statistics over fixed batches.

Each instance normalises with the statistics stored under its own key (see
:mod:`sdpoint_jax.core.norm`). Training leaves those as exponential moving averages of
whatever batches happened to draw the instance. :func:`calibrate` replaces them by an
exact cumulative average over a fixed list of ``K`` batches, computed in train mode
(batch statistics), as PyTorch's ``BatchNorm2d(momentum=None)`` does::

    mean = 1/K * sum_k mean_k        var = 1/K * sum_k unbiased_var_k

The authors' code recomputes the statistics with a moving average over the augmented
training set and discards them after evaluation; here they are exact and kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.norm import own_statistics
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.training import parallel
from sdpoint_jax.xla_cpu.memory_maps import FirstCalls

Stats = dict[tuple[str, ...], jax.Array]
"""Flattened ``batch_stats`` leaves: ``(*layer path, key, "mean" | "var") -> (C,)``."""


def _batch_moments_fn(model: SDPointModel, batch_stats: Any) -> Callable[..., Stats]:
    """Jitted ``(params, images, instance) -> Stats`` of the instance's own key.

    A train-mode step normalises with batch statistics and never reads the stored ones,
    so it runs on freshly created statistics; with momentum 0 it stores exactly that
    batch's per-channel mean and unbiased variance in those it updates (whatever the
    old values, even non-finite ones). Only the leaves the instance alone uses are
    returned (:func:`~sdpoint_jax.core.norm.own_statistics` of ``batch_stats``, the
    model's statistics, of which only the structure is read). ``instance`` is static:
    one program each.
    """
    stepper = model.clone(bn_momentum=0.0)

    @functools.partial(jax.jit, static_argnames="instance")
    def moments(params: Any, images: jax.Array, instance: Instance) -> Stats:
        _, updates = stepper.apply(
            {"params": params}, images, instance=instance, train=True, mutable=["batch_stats"]
        )
        flat = traverse_util.flatten_dict(updates["batch_stats"])
        own = own_statistics(batch_stats, instance, model.space, model.bn_mode)
        return {path: flat[path] for path in traverse_util.flatten_dict(own)}

    return moments


def _placed_like(value: jax.Array, reference: Any) -> Any:
    """``value`` with the placement of ``reference``: its sharding if it is a
    ``jax.Array``, else a numpy array (so the result mixes no device sets)."""
    if isinstance(reference, jax.Array):
        return jax.device_put(value, reference.sharding)
    return np.asarray(value)


def _check_model(model: SDPointModel, instances: Sequence[Instance]) -> list[Instance]:
    """Validates ``instances`` against ``model`` and drops repeats (order kept)."""
    if model.bn_mode != "instance":
        raise ValueError(
            f"calibration needs a model with bn_mode='instance' (per-instance statistics), "
            f"got bn_mode={model.bn_mode!r}"
        )
    return list(dict.fromkeys(model.space.validate(instance) for instance in instances))


def calibrate(
    model: SDPointModel,
    variables: Any,
    batches: Iterable[dict[str, np.ndarray]],
    instances: Sequence[Instance],
    *,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Recomputes each instance's own batch-norm statistics over ``batches``.

    Args:
      model: a model with ``bn_mode="instance"``.
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model``; not modified.
      batches: the fixed calibration batches, read once; each a dict with ``"image"``
        float32 ``(B, H, W, 3)`` (other fields are ignored). With ``mesh`` these are
        this process's parts of global batches and ``B * process_count`` must divide
        evenly over the mesh.
      instances: instances to calibrate. Instance ``(p, r)`` rewrites every statistic
        stored under ``instance.key`` (the layers after point ``p``); the full network
        rewrites the ``"full"`` key of every layer.
      mesh: if given, batches are split over its ``"data"`` axis and the variables
        replicated; batch statistics are then over the global batch.
      progress: show a progress bar over the batches.

    Returns:
      New variables (same structure and placement) in which, for each instance, every ``mean`` /
      ``var`` stored under its key is the average over the batches of the per-batch
      mean / unbiased variance of that layer's input. All other statistics (other
      instances, ``"uniform"``) and the parameters are the input's, bit for bit.

    Each instance's program compiles within the process's memory-map budget
    (:mod:`sdpoint_jax.xla_cpu.memory_maps`): train-step programs held in the process
    are freed first where it is short.

    Raises:
      ValueError: a model in ``"uniform"`` mode, an instance outside the model's space,
        or no batches.
    """
    instances = _check_model(model, instances)
    moments = _batch_moments_fn(model, variables["batch_stats"])
    params = variables["params"]
    params = params if mesh is None else parallel.replicate(params, mesh)
    sums: dict[Instance, Stats] = {}
    count = 0
    first_calls = FirstCalls()  # each instance's first call compiles: within the map budget
    for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
        images = {"image": batch["image"]}
        if mesh is not None:
            parallel.check_batch_size(len(batch["image"]) * jax.process_count(), mesh)
            images = parallel.shard_batch(images, mesh)
        for instance in instances:
            with first_calls((instance, batch["image"].shape)):
                stats = moments(params, images["image"], instance)
            previous = sums.get(instance)
            sums[instance] = stats if previous is None else jax.tree.map(jnp.add, previous, stats)
        count += 1
    if not count:
        raise ValueError("calibration needs at least one batch, got none")

    flat = traverse_util.flatten_dict(variables["batch_stats"])
    for stats in sums.values():
        flat.update(
            {path: _placed_like(total / count, flat[path]) for path, total in stats.items()}
        )
    return {**variables, "batch_stats": traverse_util.unflatten_dict(flat)}
