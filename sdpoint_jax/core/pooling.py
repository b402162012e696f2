"""Adaptive (spatial-pyramid style) pooling with PyTorch's exact bins, NHWC.

Bin ``i`` of an axis of length ``In`` pooled to ``Out`` covers the half-open range
``[floor(i * In / Out), ceil((i + 1) * In / Out))``, the bins of PyTorch's
``adaptive_avg_pool2d`` / ``adaptive_max_pool2d``. Height and width are pooled
independently. Shapes are static, so the bins are numpy constants:

* average pooling works one axis at a time: where the size divides exactly (e.g.
  32 -> 16) the bins are plain windows and a reshape-mean does it; otherwise (e.g.
  32 -> 24, overlapping bins) a small constant averaging matrix is applied with
  ``einsum`` (a dense contraction; no gather, no Python loop over bins);
* max pooling is separable as well: for each axis it takes the element-wise max of
  ``L`` gathered slices, ``L`` being the longest bin (2-4 in practice).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from sdpoint_jax.core.instance import downsampled_size

Array = jnp.ndarray


@functools.cache
def adaptive_bins(in_size: int, out_size: int) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` of every output bin, end exclusive, PyTorch convention."""
    if in_size < 1 or out_size < 1:
        raise ValueError(
            f"adaptive pooling needs sizes >= 1, got input {in_size} -> output {out_size}"
        )
    return tuple(
        ((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)) for i in range(out_size)
    )


@functools.cache
def _averaging_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix whose row ``i`` averages bin ``i``."""
    matrix = np.zeros((out_size, in_size), np.float32)
    for i, (start, end) in enumerate(adaptive_bins(in_size, out_size)):
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@functools.cache
def _max_gather_indices(in_size: int, out_size: int) -> np.ndarray:
    """``(L, out_size)`` indices: slice ``j`` picks element ``start + j`` of every bin,
    clamped to the bin's last element (repeats do not change a max)."""
    bins = adaptive_bins(in_size, out_size)
    longest = max(end - start for start, end in bins)
    return np.array(
        [[min(start + j, end - 1) for start, end in bins] for j in range(longest)],
        np.int32,
    )


def _check_nhwc(x: Array, out_hw: tuple[int, int]) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC array, got shape {x.shape}")
    for name, size in zip(("height", "width"), out_hw, strict=True):
        if size < 1:
            raise ValueError(f"adaptive pooling output {name} must be >= 1, got {out_hw}")


_AXIS_EINSUM = {1: "oh,nhwc->nowc", 2: "ow,nhwc->nhoc"}


def _average_axis(x: Array, axis: int, out_size: int) -> Array:
    """Adaptive average pooling of one spatial axis (1 = height, 2 = width)."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    if in_size % out_size == 0:  # equal, disjoint windows
        window = in_size // out_size
        return x.reshape(*x.shape[:axis], out_size, window, *x.shape[axis + 1 :]).mean(axis + 1)
    matrix = jnp.asarray(_averaging_matrix(in_size, out_size), x.dtype)
    return jnp.einsum(_AXIS_EINSUM[axis], matrix, x)


def adaptive_avg_pool(x: Array, out_hw: tuple[int, int]) -> Array:
    """Adaptive average pooling of ``x`` ``(N, H, W, C)`` to ``(N, out_h, out_w, C)``."""
    _check_nhwc(x, out_hw)
    return _average_axis(_average_axis(x, 1, out_hw[0]), 2, out_hw[1])


def adaptive_max_pool(x: Array, out_hw: tuple[int, int]) -> Array:
    """Adaptive max pooling of ``x`` ``(N, H, W, C)`` over the same bins."""
    _check_nhwc(x, out_hw)
    for axis, out_size in ((1, out_hw[0]), (2, out_hw[1])):
        indices = _max_gather_indices(x.shape[axis], out_size)
        pooled = jnp.take(x, indices[0], axis=axis)
        for row in indices[1:]:
            pooled = jnp.maximum(pooled, jnp.take(x, row, axis=axis))
        x = pooled
    return x


def downsampled_hw(hw: tuple[int, int], ratio: float) -> tuple[int, int]:
    """``(round(r*H), round(r*W))``, height and width independently."""
    return downsampled_size(hw[0], ratio), downsampled_size(hw[1], ratio)


def bin_element_count(in_size: int, out_size: int) -> int:
    """Sum of bin lengths along one axis: input elements read per channel, counting an
    element once for every bin that covers it (bins overlap when sizes do not divide)."""
    return sum(end - start for start, end in adaptive_bins(in_size, out_size))
