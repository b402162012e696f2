"""Low mode: training steps on downsampled inputs with downsampled kernels.

Poulos, Nouri and Moshovos, "Training CNNs faster with Dynamic Input and Kernel
Downsampling" (paper 003 in ``shared/papers``). Some mini-batches run in *low mode*:
the input images are downsampled by an integer ratio ``r`` (Sect. 2.2.1) and selected
convolution kernels ``K x K`` are average-pooled to a smaller kernel (Sect. 2.2.2).
Pooling is differentiable, so the gradient of the small kernel reaches the full-size
kernel, which is the only parameter (Sect. 3, Eq. 4). Other steps run the network
unchanged (*full mode*). This module holds the three pieces:

* the kernel transform :func:`downsample_kernel` (and :class:`DownsampledKernelConv`,
  the convolution that applies it inside ``flax.linen.Conv``);
* the input transform :func:`downsample_images`;
* the schedule :class:`LowModeSchedule`: a Bernoulli draw per step with per-epoch
  probabilities, full mode forced for some epochs after each learning-rate drop
  (Sect. 3.1, Algorithm 1, Sect. 4).

A low-mode pass is described by one static, hashable :class:`LowMode` value; like an
SDPoint instance it compiles into its own XLA program.

Kernel downsampling rule (Sect. 2.2.2). The paper proposes "an average pooling
operator that produces filters with odd dimensions": a ``K x K`` kernel becomes
``ceil(K/r) x ceil(K/r)`` (its example: ``r = 2``, 5x5 -> 3x3 by 2x2 pooling with
stride 2 and asymmetric padding), "alternatively ``floor(K/r)``" (its example, used
in its experiments: 3x3 -> 1x1 by 3x3 average pooling, the mean over the taps). We
take, per spatial axis, the odd one of the two:

* ``K' = ceil(K/r)`` when it is odd: windows of ``r`` taps with stride ``r``; the
  ``r * K' - K`` padding taps go at the end (bottom/right, TensorFlow's ``"SAME"``
  convention) and are left out of the mean, so every output tap is the mean of real
  taps. 5x5, r=2 -> 3x3 from taps ``{0,1}, {2,3}, {4}``.
* otherwise ``K' = floor(K/r)`` (always odd then): windows of ``w = K - r (K' - 1)``
  taps with stride ``r`` and no padding, which cover the kernel exactly. 3x3, r=2 ->
  1x1 is the 3x3 mean; 7x7, r=2 (``ceil`` would give an even 4) -> 3x3 from taps
  ``{0,1,2}, {2,3,4}, {4,5,6}`` (3x3 pooling with stride 2).

Odd sizes keep PyTorch-style ``K' // 2`` padding size-preserving, so residual
additions still line up; kernel strides are unchanged (Sect. 4, item 9).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdpoint_jax.core.convolution import conv_general_dilated

RESIZE_METHODS: tuple[str, ...] = ("gaussian", "bilinear")


def check_ratio(ratio: Any) -> int:
    """``ratio`` as an ``int``; ``ValueError`` unless it is an integer ``>= 2``."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | np.integer) or ratio < 2:
        raise ValueError(f"low-mode ratio must be an integer >= 2, got {ratio!r}")
    return int(ratio)


def check_probability(name: str, value: Any) -> float:
    """``value`` as a ``float``; ``ValueError`` unless it lies in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class LowMode:
    """One low-mode setting (hashable: part of the jit cache key).

    Attributes:
      ratio: integer ``r >= 2``: inputs ``H x W -> H/r x W/r``, eligible kernels
        ``K -> low_kernel_size(K, r)``.
      resize: input downsampling, ``"gaussian"`` (blur and decimation, the paper's
        preference) or ``"bilinear"`` (see :func:`downsample_images`).
    """

    ratio: int = 2
    resize: str = "gaussian"

    NAME_PREFIX: ClassVar[str] = "low:"
    """``str(low_mode)`` is this prefix and the ratio, e.g. ``"low:2"`` (the key of its
    step count among a run's draws)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.resize not in RESIZE_METHODS:
            raise ValueError(
                f"low-mode resize must be one of {RESIZE_METHODS}, got {self.resize!r}"
            )

    def input_hw(self, hw: Sequence[int]) -> tuple[int, int]:
        """``(H / r, W / r)``; ``ValueError`` unless ``r`` divides ``H`` and ``W``."""
        height, width = (int(size) for size in hw)
        if height % self.ratio or width % self.ratio:
            raise ValueError(
                f"low-mode ratio {self.ratio} must divide the input size, got {height}x{width}"
            )
        return height // self.ratio, width // self.ratio

    def __str__(self) -> str:
        return f"{self.NAME_PREFIX}{self.ratio}"


# --------------------------------------------------------------------------------------
# Kernel downsampling (Sect. 2.2.2).


def low_kernel_size(kernel: int, ratio: int) -> int:
    """Side ``K'`` of a downsampled ``K``-tap kernel axis: ``ceil(K/r)`` if odd, else
    ``floor(K/r)`` (see the module docstring). ``K`` must be odd."""
    ratio = check_ratio(ratio)
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel size must be an odd integer >= 1, got {kernel!r}")
    ceil = -(-kernel // ratio)
    return ceil if ceil % 2 else kernel // ratio


@functools.cache
def kernel_pooling_matrix(kernel: int, ratio: int) -> np.ndarray:
    """``(K', K)`` float32 averaging matrix of one kernel axis: row ``i`` holds
    ``1 / |window i|`` on the taps of window ``i`` (the rule of the module docstring)."""
    size = low_kernel_size(kernel, ratio)
    if -(-kernel // ratio) == size:
        windows = [(i * ratio, min((i + 1) * ratio, kernel)) for i in range(size)]
    else:
        width = kernel - ratio * (size - 1)
        windows = [(i * ratio, i * ratio + width) for i in range(size)]
    matrix = np.zeros((size, kernel), np.float32)
    for row, (start, stop) in enumerate(windows):
        matrix[row, start:stop] = 1.0 / (stop - start)
    matrix.flags.writeable = False
    return matrix


def downsample_kernel(kernel: jax.Array, ratio: int) -> jax.Array:
    """Average-pools an ``HWIO`` kernel ``(Kh, Kw, C_in, C_out)`` to
    ``(Kh', Kw', C_in, C_out)`` (``K' = low_kernel_size(K, ratio)`` per axis).

    A linear map, ``F' = A_h F A_w^T`` per channel pair, so its gradient is
    ``dL/dF = A_h^T (dL/dF') A_w``: every full-size tap receives the small kernel's
    gradient divided among the windows that contain it (paper Eq. 4). Computed in
    float32 and returned in ``kernel``'s dtype.
    """
    rows = jnp.asarray(kernel_pooling_matrix(kernel.shape[0], ratio))
    cols = jnp.asarray(kernel_pooling_matrix(kernel.shape[1], ratio))
    pooled = jnp.einsum(
        "ik,jl,klcn->ijcn",
        rows,
        cols,
        kernel.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    return pooled.astype(kernel.dtype)


@dataclasses.dataclass(frozen=True)
class DownsampledKernelConv:
    """Drop-in for ``lax.conv_general_dilated`` (``flax.linen.Conv``'s
    ``conv_general_dilated`` hook) that convolves with the downsampled kernel.

    The module keeps its full-size ``kernel`` parameter; this hook receives it, applies
    :func:`downsample_kernel` and convolves with PyTorch-style padding ``K' // 2`` on
    each side (the ``padding`` the module passes, meant for the full kernel, is
    replaced). Strides and grouping are the module's. Expects Flax's ``NHWC`` /
    ``HWIO`` layout and no dilation. The convolution itself is
    :func:`sdpoint_jax.core.convolution.conv_general_dilated`, lowered as the program
    being traced says.

    Attributes:
      ratio: the low-mode ratio ``r``.
    """

    ratio: int

    def kernel_size(self, kernel_size: Sequence[int]) -> tuple[int, ...]:
        """The kernel size the convolution runs with."""
        return tuple(low_kernel_size(int(k), self.ratio) for k in kernel_size)

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        window_strides: Sequence[int],
        padding: str | Sequence[tuple[int, int]],
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
        del padding  # meant for the full-size kernel
        if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
            raise ValueError("low-mode kernels support undilated convolutions only")
        small = downsample_kernel(rhs, self.ratio)
        pads = tuple((k // 2, k // 2) for k in small.shape[:2])
        return conv_general_dilated(
            lhs,
            small,
            window_strides,
            pads,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )


# --------------------------------------------------------------------------------------
# Input downsampling (Sect. 2.2.1).


@functools.cache
def gaussian_decimation_matrix(size: int, ratio: int) -> np.ndarray:
    """``(size / r, size)`` float32 matrix: Gaussian blur, then one sample per block.

    Output ``i`` is a Gaussian-weighted mean of the inputs around the centre of its
    block of ``r`` pixels, ``c_i = r i + (r - 1) / 2`` (so the result is not shifted),
    with ``sigma = 2 r / 6`` (the Gaussian-pyramid rule of scikit-image's
    ``pyramid_reduce``), truncated at ``4 sigma``; taps outside the image are dropped
    and each row renormalised to sum to 1 (constant images stay constant).
    """
    ratio = check_ratio(ratio)
    if size % ratio:
        raise ValueError(f"low-mode ratio {ratio} must divide the input size, got {size}")
    sigma = 2.0 * ratio / 6.0
    taps = np.arange(size, dtype=np.float64)
    centres = ratio * np.arange(size // ratio, dtype=np.float64) + (ratio - 1) / 2.0
    offset = taps[None, :] - centres[:, None]
    weights = np.where(np.abs(offset) <= 4.0 * sigma, np.exp(-0.5 * (offset / sigma) ** 2), 0.0)
    matrix = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def downsample_images(images: jax.Array, mode: LowMode) -> jax.Array:
    """Images ``(B, H, W, C)`` -> ``(B, H / r, W / r, C)``, in ``images``' dtype.

    ``mode.resize == "gaussian"``: separable Gaussian blur and decimation
    (:func:`gaussian_decimation_matrix`), the paper's preference ("it behaves well for
    ``r > 2``"). ``"bilinear"``: bilinear interpolation at the output pixel centres
    without anti-aliasing (``jax.image.resize``); for ``r = 2`` that is the mean of
    each 2x2 block. ``ValueError`` unless ``r`` divides ``H`` and ``W``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (B, H, W, C), got shape {images.shape}")
    out_h, out_w = mode.input_hw(images.shape[1:3])
    if mode.resize == "bilinear":
        shape = (images.shape[0], out_h, out_w, images.shape[3])
        return jax.image.resize(images, shape, "bilinear", antialias=False)
    rows = jnp.asarray(gaussian_decimation_matrix(images.shape[1], mode.ratio))
    cols = jnp.asarray(gaussian_decimation_matrix(images.shape[2], mode.ratio))
    out = jnp.einsum(
        "ih,bhwc,jw->bijc",
        rows,
        images.astype(jnp.float32),
        cols,
        precision=lax.Precision.HIGHEST,
    )
    return out.astype(images.dtype)
