"""Batch normalisation with running statistics kept per SDPoint instance.

SDPoint instances see feature maps of different sizes, so their batch statistics
differ (paper Sect. 5.1). :class:`KeyedBatchNorm` keeps one ``{mean, var}`` pair per
*key* in the ``batch_stats`` collection::

    batch_stats/<layer path>/<key>/{mean, var}      # key: "full" or e.g. "p3_r0p5"

Which key a layer uses under an instance follows from where it sits, by one rule
(:func:`statistics_key`); the keys it owns (:func:`layer_keys`) and the parts of a
model's statistics a step or an instance uses (:func:`trained_statistics`,
:func:`own_statistics`) derive from that rule. Every
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

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sdpoint_jax.core.instance import FULL_KEY, Instance, InstanceSpace

BN_MODES = ("instance", "uniform")
UNIFORM_KEY = "uniform"


FIRST_BLOCK = 1
"""The building block before every downsampling point. No instance changes its input,
so under every instance a layer of this block uses ``"full"`` (``"uniform"`` with
``bn_mode="uniform"``): networks without points key every layer with it."""


def statistics_key(block: int, instance: Instance, bn_mode: str = "instance") -> str:
    """The statistics key a BN layer in ``block`` reads and updates under ``instance``:
    the one keying rule, from which every other key set here derives.

    A layer in block ``b`` (the building block that ends at point ``b``; layers after
    the last point have ``b = N + 1``) sees a full-size input under instance ``(p, r)``
    when ``p = 0`` or ``b <= p`` and then uses the shared ``"full"`` key; only
    instances with ``1 <= p < b`` change its input, and each uses its own key
    (``instance.key``, e.g. ``"p3_r0p5"``). ``bn_mode="uniform"`` (the UBN baseline)
    uses ``"uniform"`` for every instance.
    """
    check_bn_mode(bn_mode)
    _check_block(block)
    if bn_mode == "uniform":
        return UNIFORM_KEY
    if instance.is_full or block <= instance.point:
        return FULL_KEY
    return instance.key


def layer_keys(block: int, ratios: Sequence[float], bn_mode: str) -> tuple[str, ...]:
    """Every statistics key a BN layer in ``block`` owns: the keys
    :func:`statistics_key` gives it over all instances, then ``"uniform"``.

    Instances with a point at or after ``block`` all give ``"full"``, so the instances
    with points ``1..block - 1`` and the full one give every key: ``"full"``, one key
    per instance with ``1 <= p < b`` (points in order, ratios in the given order) and
    ``"uniform"``; ``bn_mode="uniform"`` owns ``"uniform"`` only.
    """
    _check_block(block)
    preceding = InstanceSpace(block - 1, tuple(ratios))
    keys = (statistics_key(block, instance, bn_mode) for instance in preceding)
    return tuple(dict.fromkeys((*keys, UNIFORM_KEY)))


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < FIRST_BLOCK:
        raise ValueError(f"block must be an integer >= {FIRST_BLOCK}, got {block!r}")


@functools.cache
def _blocks_by_keys(space: InstanceSpace, bn_mode: str) -> dict[frozenset[str], int]:
    """The block of a layer of a model of ``space`` from the keys it owns
    (:func:`layer_keys` inverted). With ``bn_mode="uniform"`` every block owns the same
    key; the first stands for all, as every block has the same :func:`statistics_key`."""
    blocks: dict[frozenset[str], int] = {}
    for block in range(FIRST_BLOCK, space.num_points + 2):
        blocks.setdefault(frozenset(layer_keys(block, space.ratios, bn_mode)), block)
    return blocks


def _select(
    batch_stats: Mapping[str, Any],
    space: InstanceSpace,
    bn_mode: str,
    keys_of: Callable[[int], Sequence[str]],
) -> dict:
    """``batch_stats`` with each layer restricted to ``keys_of(its block)``, the block
    following from the keys the layer owns. A layer is a mapping of keys to ``{"mean",
    "var"}`` pairs; any other mapping is a scope of layers."""
    blocks = _blocks_by_keys(space, bn_mode)

    def select(node: Mapping[str, Any]) -> dict:
        if not all(_is_statistics(child) for child in node.values()):
            return {name: select(child) for name, child in node.items()}
        block = blocks.get(frozenset(node))
        if block is None:
            raise ValueError(
                f"a batch-norm layer owning keys {sorted(node)} is in no block of a model "
                f"of {space} with bn_mode={bn_mode!r}"
            )
        return {key: node[key] for key in keys_of(block)}

    return select(batch_stats)


def trained_statistics(
    batch_stats: Mapping[str, Any],
    instance: Instance | None,
    space: InstanceSpace,
    bn_mode: str = "instance",
) -> dict:
    """The part of the ``batch_stats`` of a model of ``space`` and ``bn_mode`` that a
    training step of ``instance`` reads and updates; ``None`` for a low-mode step, which
    updates none (an empty dict).

    In each layer that is the :func:`statistics_key` of its block and ``"uniform"``.

    Raises:
      ValueError: a layer owning keys that no block of such a model owns.
    """
    if instance is None:
        return {}

    def trained(block: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys((statistics_key(block, instance, bn_mode), UNIFORM_KEY)))

    return _select(batch_stats, space, bn_mode, trained)


def own_statistics(
    batch_stats: Mapping[str, Any],
    instance: Instance,
    space: InstanceSpace,
    bn_mode: str = "instance",
) -> dict:
    """The part of ``batch_stats`` (as in :func:`trained_statistics`) that ``instance``
    alone uses: in each layer whose :func:`statistics_key` under ``instance`` is the
    instance's own key, that key. For the full instance this is ``"full"`` in every
    layer; for ``(p, r)`` its key in the layers after point ``p``; other layers are
    empty mappings.

    Raises:
      ValueError: as :func:`trained_statistics`.
    """

    def own(block: int) -> tuple[str, ...]:
        key = statistics_key(block, instance, bn_mode)
        return (key,) if key == instance.key else ()

    return _select(batch_stats, space, bn_mode, own)


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
