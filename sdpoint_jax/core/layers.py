"""Layers shared by every architecture.

Convolutions use explicit PyTorch-equivalent padding (``kernel // 2`` on each side):
Flax's ``"SAME"`` pads strided convolutions asymmetrically on even inputs, PyTorch's
``padding=1`` does not. The parameterless layers (:class:`Relu`, :class:`Add`,
:class:`Pool`, ...) are modules so that :mod:`sdpoint_jax.models.cost` can count them.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdpoint_jax.core.convolution import conv_general_dilated
from sdpoint_jax.core.lowmode import DownsampledKernelConv
from sdpoint_jax.core.pooling import adaptive_avg_pool, adaptive_max_pool

PoolKind = Literal["avg", "max"]

# PyTorch/authors' initialisation: conv weights ~ N(0, 2 / (k * k * out_channels)),
# linear weights ~ U(-1/sqrt(in), 1/sqrt(in)) with zero bias.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    groups: int = 1,
    use_bias: bool = False,
    dtype: Any = None,
    kernel_ratio: int | None = None,
    name: str | None = None,
) -> nn.Conv:
    """A ``kernel x kernel`` convolution padded like PyTorch's ``padding=kernel // 2``.

    It convolves with :func:`sdpoint_jax.core.convolution.conv_general_dilated`, lowered as
    the program being traced says (e.g. through matrix products over its patch matrix
    in CPU training programs, :mod:`sdpoint_jax.xla_cpu.conv_lowering`).
    ``kernel_ratio=r`` (low mode) convolves with the kernel average-pooled by ``r``
    (:class:`sdpoint_jax.core.lowmode.DownsampledKernelConv`, padded for the smaller
    kernel); the parameter is still the full-size kernel.
    """
    hook = conv_general_dilated if kernel_ratio is None else DownsampledKernelConv(kernel_ratio)
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=conv_init,
        dtype=dtype,
        conv_general_dilated=hook,
        name=name,
    )


def classifier(num_classes: int, *, dtype: Any = None, name: str = "classifier") -> nn.Dense:
    return nn.Dense(num_classes, kernel_init=dense_init, dtype=dtype, name=name)


class Relu(nn.Module):
    """Element-wise ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


class Add(nn.Module):
    """Residual addition ``x + shortcut``."""

    @nn.compact
    def __call__(self, x: jax.Array, shortcut: jax.Array) -> jax.Array:
        return x + shortcut


class Pool(nn.Module):
    """Fixed ``window x window`` pooling with stride and PyTorch-style padding.

    Attributes:
      kind: ``"avg"`` (zero padding counts, as PyTorch's default) or ``"max"``
        (padding is ``-inf``).
      window, stride, padding: as in PyTorch's ``MaxPool2d``/``AvgPool2d``.
      ceil_mode: PyTorch's ``ceil_mode=True``: the last window may hang over the
        bottom/right edge, so a map never shrinks to 0 pixels.
    """

    kind: PoolKind
    window: int
    stride: int
    padding: int = 0
    ceil_mode: bool = False

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(self._output_size(size) for size in hw)  # type: ignore[return-value]

    def _output_size(self, size: int) -> int:
        span = size + 2 * self.padding - self.window
        out = (-(-span // self.stride) if self.ceil_mode else span // self.stride) + 1
        if self.ceil_mode and (out - 1) * self.stride >= size + self.padding:
            out -= 1  # PyTorch: the last window must start inside the input or left pad
        return out

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_hw = self.output_hw(x.shape[1:3])
        if min(out_hw) < 1:
            raise ValueError(
                f"{self.kind} pooling (window {self.window}, stride {self.stride}) of a "
                f"{x.shape[1]}x{x.shape[2]} feature map leaves no pixels; the input "
                f"image or an SDPoint ratio is too small for this network"
            )
        padding = tuple(
            (
                self.padding,
                self.padding
                + max(0, (out - 1) * self.stride + self.window - size - 2 * self.padding),
            )
            for size, out in zip(x.shape[1:3], out_hw, strict=True)
        )
        window = (self.window, self.window)
        strides = (self.stride, self.stride)
        if self.kind == "max":
            return nn.max_pool(x, window, strides, padding=padding)
        return nn.avg_pool(x, window, strides, padding=padding)


class AdaptivePool(nn.Module):
    """Adaptive average or max pooling to ``out_hw`` (PyTorch bins)."""

    kind: PoolKind
    out_hw: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pool = adaptive_avg_pool if self.kind == "avg" else adaptive_max_pool
        return pool(x, self.out_hw)


class GlobalAvgPool(nn.Module):
    """Mean over height and width: ``(N, H, W, C) -> (N, C)`` for any ``H, W``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))
