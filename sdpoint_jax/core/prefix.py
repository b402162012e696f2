"""The prefix SDPoint instances share, and running a network from it.

Every point ``p`` of a network is preceded by a :class:`PointTap`: an identity layer
on the map that leaves building block ``p``, before any pooling of that point
(:meth:`sdpoint_jax.core.points.SDPointContext.point` calls it). Everything a forward
pass computes before tap ``d`` is its *prefix of depth* ``d``.

When prefixes are equal. Instance ``(p, r)`` changes nothing before its point, so the
prefixes of depth ``d`` of two instances are the same computation (same layers, same
map sizes, same parameters) when ``d`` is at most both instances' :func:`prefix_depth`
(``p``; ``N`` for the full network, whose every map is full size) and every batch-norm
layer of blocks ``1..d`` reads the same statistics under both. That last condition is
the keying rule of :func:`sdpoint_jax.core.norm.statistics_key`, checked here rather
than assumed (:func:`shares_prefix`): with ``bn_mode="instance"`` a layer of block
``b <= p`` reads ``"full"`` under ``(p, r)`` and under the full network; with
``bn_mode="uniform"`` every layer reads ``"uniform"`` under every instance. Both modes
therefore share prefixes; a keying that gave a prefix layer per-instance statistics
would not, and :func:`shares_prefix` then says no.

Running from a prefix (:func:`tapped`). Inside a traced function, ``tapped(resume=(d,
activation))`` makes tap ``d`` return ``activation`` instead of its input, so the layers
before it feed nothing and XLA removes them from the compiled program;
``capture=d`` records the map at tap ``d``. Only the taps' outputs change: what follows
them is the network's own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax

from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.norm import statistics_key


class PointTap(nn.Module):
    """Identity on the map ``(B, H, W, C)`` leaving building block ``index``, before
    point ``index`` pools it; :func:`tapped` reads or replaces it."""

    index: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def prefix_depth(instance: Instance, space: InstanceSpace) -> int:
    """The deepest tap whose prefix ``instance`` computes at full size: its point ``p``,
    or ``N`` (the last point) for the full network."""
    space.validate(instance)
    return space.num_points if instance.is_full else instance.point


def shares_prefix(a: Instance, b: Instance, depth: int, space: InstanceSpace, bn_mode: str) -> bool:
    """Whether ``a`` and ``b`` compute the same prefix of ``depth`` (module docstring):
    ``1 <= depth <=`` both :func:`prefix_depth` and every block ``1..depth`` keys its
    batch-norm statistics alike under both."""
    if not 1 <= depth <= min(prefix_depth(a, space), prefix_depth(b, space)):
        return False
    return all(
        statistics_key(block, a, bn_mode) == statistics_key(block, b, bn_mode)
        for block in range(1, depth + 1)
    )


@contextlib.contextmanager
def tapped(
    *, resume: tuple[int, jax.Array] | None = None, capture: int | None = None
) -> Iterator[list[jax.Array]]:
    """Within the block, tap ``resume[0]`` returns ``resume[1]`` (the map the prefix of
    that depth computed earlier, same shape) and the map at tap ``capture`` is appended
    to the yielded list. Use it around ``model.apply`` inside the traced function."""
    captured: list[jax.Array] = []

    def interceptor(next_fun, args, kwargs, context):
        if not isinstance(context.module, PointTap) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        index = context.module.index
        if resume is not None and index == resume[0]:
            if resume[1].shape != args[0].shape:
                raise ValueError(
                    f"the map resumed at point {index} has shape {resume[1].shape}; the "
                    f"network has {args[0].shape} there"
                )
            out = resume[1]
        else:
            out = next_fun(*args, **kwargs)
        if index == capture:
            captured.append(out)
        return out

    with nn.intercept_methods(interceptor):
        yield captured
