"""Batch normalisation with running statistics kept per SDPoint instance.

SDPoint instances see feature maps of different sizes, so their batch statistics
differ (paper Sect. 5.1). :class:`KeyedBatchNorm` keeps one ``{mean, var}`` pair per
*key* in the ``batch_stats`` collection::

    batch_stats/<layer path>/<key>/{mean, var}      # key: "full" or e.g. "p3_r0p5"

Which keys a layer needs follows from where it sits (:func:`layer_keys`). Every
layer also keeps a ``"uniform"`` key that every training step updates, whatever the
instance: the statistics "averaged from many training iterations" of the paper's UBN
baseline, so one SDPoint run can be evaluated both ways. ``scale`` and
``bias`` are ordinary parameters shared by every instance: every instance uses all
parameters.

Numerics follow PyTorch's ``BatchNorm2d`` (the authors' framework): training
normalises with the biased batch variance and updates the running variance with the
unbiased one; ``momentum=0.9`` here equals PyTorch's ``momentum=0.1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sdpoint_jax.core.instance import FULL_KEY, Instance

BN_MODES = ("instance", "uniform")
UNIFORM_KEY = "uniform"


def layer_keys(block: int, ratios: Sequence[float], bn_mode: str) -> tuple[str, ...]:
    """Every statistics key a BN layer in ``block`` can need.

    A layer in block ``b`` (the building block that ends at point ``b``; layers after
    the last point have ``b = N + 1``) sees a full-size input under instance ``(p, r)``
    when ``p = 0`` or ``b <= p``; only instances with ``1 <= p < b`` change its input.
    So it owns ``"full"``, one key per instance with ``1 <= p < b``, and
    ``"uniform"``. ``bn_mode="uniform"`` (the UBN baseline) owns ``"uniform"`` only.
    """
    check_bn_mode(bn_mode)
    if bn_mode == "uniform":
        return (UNIFORM_KEY,)
    instance_keys = tuple(
        Instance(point, ratio).key for point in range(1, block) for ratio in ratios
    )
    return (FULL_KEY, *instance_keys, UNIFORM_KEY)


def active_key(block: int, instance: Instance, bn_mode: str) -> str:
    """The key a BN layer in ``block`` reads and updates under ``instance``."""
    check_bn_mode(bn_mode)
    if bn_mode == "uniform":
        return UNIFORM_KEY
    if instance.is_full or block <= instance.point:
        return FULL_KEY
    return instance.key


def trained_statistics(batch_stats: Mapping[str, Any], instance: Instance | None) -> dict:
    """The part of a model's ``batch_stats`` that a training step of ``instance`` reads
    and updates; ``None`` for a low-mode step, which updates none (an empty dict).

    In each layer that is the active key and ``"uniform"``. A layer owns the instance's
    own key exactly when the instance changes its input (:func:`layer_keys`), so the
    active key (:func:`active_key`) is that key where the layer owns it and ``"full"``
    elsewhere; a layer owning ``"uniform"`` alone (``bn_mode="uniform"``) uses that.
    A layer is a mapping of keys to ``{"mean", "var"}`` pairs; any other mapping is a
    scope of layers.
    """
    if instance is None:
        return {}

    def select(node: Mapping[str, Any]) -> dict:
        if not all(_is_statistics(child) for child in node.values()):
            return {name: select(child) for name, child in node.items()}
        active = instance.key if instance.key in node else FULL_KEY
        return {key: node[key] for key in dict.fromkeys((active, UNIFORM_KEY)) if key in node}

    return select(batch_stats)


def merge_statistics(batch_stats: Mapping[str, Any], part: Mapping[str, Any]) -> dict:
    """``batch_stats`` with the entries of ``part`` (a :func:`trained_statistics`
    subtree) put in their place; ``batch_stats`` itself is left as it is."""
    merged = dict(batch_stats)
    for name, child in part.items():
        merged[name] = (
            merge_statistics(batch_stats[name], child) if isinstance(child, Mapping) else child
        )
    return merged


def _is_statistics(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"mean", "var"}


def check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")


def _initial_stats(features: int) -> dict[str, jax.Array]:
    return {
        "mean": jnp.zeros((features,), jnp.float32),
        "var": jnp.ones((features,), jnp.float32),
    }


class KeyedBatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with per-key running statistics.

    Attributes:
      keys: every statistics key this layer owns; all are created by ``init`` so that
        ``apply(..., mutable=False)`` works for any instance.
      key: the key used by this call (must be in ``keys``).
      use_running_average: normalise with the stored statistics of ``key`` (eval);
        otherwise with batch statistics, updating the running statistics of ``key``
        and of ``"uniform"`` (if owned) when ``update_running_stats``.
      update_running_stats: with batch statistics, whether to update the running
        ones; False for low-mode passes (see :mod:`sdpoint_jax.core.points`).
      momentum: running = momentum * running + (1 - momentum) * batch statistic.
      epsilon: added to the variance.
      axis_name: if set, batch statistics are averaged over this mapped axis
        (``shard_map``/``pmap``); under ``jit`` with a sharded batch this is not
        needed, since the means are already global.
      dtype: output dtype; statistics are always computed in float32.

    Input ``(..., C)``; output has the same shape.
    """

    keys: tuple[str, ...]
    key: str
    use_running_average: bool
    update_running_stats: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.key not in self.keys:
            raise ValueError(f"statistics key {self.key!r} is not among {self.keys}")
        features = x.shape[-1]
        # init creates every key; apply only touches the ones it reads or updates.
        if self.is_initializing():
            keys = self.keys
        elif self.use_running_average:
            keys = (self.key,)
        elif not self.update_running_stats:
            keys = ()
        else:
            keys = tuple(dict.fromkeys(k for k in (self.key, UNIFORM_KEY) if k in self.keys))
        owned = {key: self.variable("batch_stats", key, _initial_stats, features) for key in keys}
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)

        if self.use_running_average:
            mean, var = owned[self.key].value["mean"], owned[self.key].value["var"]
        else:
            # init may run outside the mapped axis (as in flax's BatchNorm)
            axis_name = None if self.is_initializing() else self.axis_name
            mean, var, count = batch_moments(x, axis_name)
            if not self.is_initializing():
                batch = {"mean": mean, "var": var * (count / max(count - 1, 1))}
                for key in keys:
                    owned[key].value = jax.tree.map(
                        lambda old, new: self.momentum * old + (1.0 - self.momentum) * new,
                        owned[key].value,
                        batch,
                    )
        multiplier = scale * lax.rsqrt(var + self.epsilon)
        offset = bias - mean * multiplier
        dtype = self.dtype or x.dtype
        return (x * multiplier.astype(dtype) + offset.astype(dtype)).astype(dtype)


def batch_moments(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array, int]:
    """Per-channel mean and biased variance of ``x`` over all axes but the last.

    Two-pass (mean, then mean squared deviation) in float32. Returns the number of
    elements each statistic averages over, summed across ``axis_name`` if given.
    """
    reduce_axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.float32)
    count = 1
    for axis in reduce_axes:
        count *= x.shape[axis]
    mean = jnp.mean(x, reduce_axes)
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(x - mean), reduce_axes)
    if axis_name is not None:
        var = lax.pmean(var, axis_name)
        count *= lax.axis_size(axis_name)
    return mean, var, count
