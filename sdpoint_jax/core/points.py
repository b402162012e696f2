"""The one hook every architecture calls: SDPoint downsampling points and BN keying.

Architectures number their downsampling points ``1..N`` in forward order and call

* ``ctx.point(x, index)`` right after building block ``index``: the identity unless
  ``index`` is the instance's point, in which case the map is average-pooled to
  ``round(r * H) x round(r * W)`` with adaptive bins (paper Eq. 1);
* ``ctx.point(x, index, replaces=fixed_pool)`` where the point *replaces* a fixed
  downsampling layer (the ImageNet stem's 3x3/2 max pool): when active, the fixed
  layer is replaced by adaptive pooling of the same kind to
  ``round(r * size the fixed layer would produce)``, as in the authors' code;
* ``ctx.conv(features, kernel, stride)`` for every convolution (in the pass's dtype);
  ``low_mode_eligible=True`` marks the convolutions whose
  kernels low mode downsamples;
* ``ctx.norm(block)`` for every batch-norm layer, ``block`` being the index of the
  point that ends the layer's building block (``N + 1`` after the last point);
* ``ctx.input(images)`` on the network's input (downsampled in low mode).

Architectures never see how pooling, statistics keying or low mode work.

Low mode (:mod:`sdpoint_jax.core.lowmode`, paper 003) is one more static field of the
context: with ``low_mode`` set, the input is downsampled by ``low_mode.ratio``, the
eligible convolutions run with their average-pooled kernels (same parameters), and
batch-norm layers normalise with batch statistics without updating any running
statistics. Paper 003 says nothing about batch norm; since both modes normalise with
their own batch statistics in training, the choice only concerns the running
statistics used at evaluation, which runs in full mode. Low-mode moments differ from
full-mode ones (smaller maps, pooled kernels: a 3x3 -> 1x1 mean kernel shrinks a
convolution's response), so low-mode steps leave the full (and uniform) statistics
as the full-mode steps made them, and need no keys of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.layers import AdaptivePool, Pool, conv
from sdpoint_jax.core.lowmode import LowMode, downsample_images
from sdpoint_jax.core.norm import KeyedBatchNorm, check_bn_mode, layer_keys, statistics_key
from sdpoint_jax.core.pooling import downsampled_hw
from sdpoint_jax.core.prefix import PointTap


@dataclasses.dataclass(frozen=True)
class SDPointContext:
    """Static description of one forward pass (hashable; part of the jit cache key).

    Attributes:
      instance: the SDPoint instance to run (validated against ``space``).
      space: the model's instance space (points ``1..N``, ratios).
      train: batch statistics (and running-statistics updates) if True.
      bn_mode: ``"instance"`` (per-instance statistics) or ``"uniform"`` (UBN).
      bn_axis_name: optional mapped axis to average batch statistics over.
      bn_momentum: running-statistics momentum (0 stores the last batch's moments).
      dtype: compute dtype of convolutions and normalised activations.
      low_mode: run this pass in low mode (see the module docstring); None: full mode.
    """

    instance: Instance
    space: InstanceSpace
    train: bool
    bn_mode: str = "instance"
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Any = None
    low_mode: LowMode | None = None

    def __post_init__(self) -> None:
        self.space.validate(self.instance)
        check_bn_mode(self.bn_mode)
        if self.low_mode is not None and not isinstance(self.low_mode, LowMode):
            raise ValueError(f"low_mode must be a LowMode or None, got {self.low_mode!r}")

    def input(self, images: jax.Array) -> jax.Array:
        """The network's input: ``images`` ``(B, H, W, C)``, downsampled to
        ``(B, H / r, W / r, C)`` in low mode."""
        return images if self.low_mode is None else downsample_images(images, self.low_mode)

    def norm(self, block: int, *, name: str | None = None) -> KeyedBatchNorm:
        """A batch-norm layer for building block ``block`` (``1..N+1``)."""
        self._check_index(block, upper=self.space.num_points + 1)
        return KeyedBatchNorm(
            keys=layer_keys(block, self.space.ratios, self.bn_mode),
            key=statistics_key(block, self.instance, self.bn_mode),
            use_running_average=not self.train,
            update_running_stats=self.low_mode is None,
            axis_name=self.bn_axis_name,
            momentum=self.bn_momentum,
            dtype=self.dtype,
            name=name,
        )

    def conv(
        self,
        features: int,
        kernel: int,
        stride: int = 1,
        *,
        groups: int = 1,
        use_bias: bool = False,
        low_mode_eligible: bool = False,
        name: str | None = None,
    ) -> nn.Conv:
        """A PyTorch-padded convolution in this pass's dtype
        (:func:`sdpoint_jax.core.layers.conv`).

        ``low_mode_eligible``: in low mode the convolution runs with its kernel
        average-pooled by the low-mode ratio (:func:`sdpoint_jax.core.lowmode.downsample_kernel`,
        padding ``K' // 2``); the parameter is the full-size kernel in both modes.
        """
        low = self.low_mode is not None and low_mode_eligible
        return conv(
            features,
            kernel,
            stride,
            groups=groups,
            use_bias=use_bias,
            dtype=self.dtype,
            kernel_ratio=self.low_mode.ratio if low else None,
            name=name,
        )

    def point(self, x: jax.Array, index: int, *, replaces: Pool | None = None) -> jax.Array:
        """Downsampling point ``index`` applied to ``x`` ``(N, H, W, C)``, after its
        :class:`sdpoint_jax.core.prefix.PointTap` (the identity unless a prefix is
        being reused)."""
        self._check_index(index, upper=self.space.num_points)
        x = PointTap(index)(x)
        if index != self.instance.point:
            return x if replaces is None else replaces(x)
        size = x.shape[1:3] if replaces is None else replaces.output_hw(x.shape[1:3])
        out_hw = downsampled_hw(size, self.instance.ratio)
        if min(out_hw) < 1:
            raise ValueError(
                f"instance {self.instance} pools the {size[0]}x{size[1]} map at point "
                f"{index} to {out_hw[0]}x{out_hw[1]}: no pixels left; use a ratio > "
                f"{0.5 / min(size):.3g} or a larger input"
            )
        kind = "avg" if replaces is None else replaces.kind
        return AdaptivePool(kind, out_hw)(x)

    def _check_index(self, index: int, *, upper: int) -> None:
        if not 1 <= index <= upper:
            raise ValueError(f"point/block index {index} outside 1..{upper}")
