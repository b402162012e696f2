"""Base class of all SDPoint architectures."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdpoint_jax.core.instance import DEFAULT_RATIOS, Instance, InstanceSpace
from sdpoint_jax.core.layers import GlobalAvgPool, classifier
from sdpoint_jax.core.lowmode import LowMode
from sdpoint_jax.core.points import SDPointContext


class SDPointModel(nn.Module, kw_only=True):
    """An image classifier with SDPoint downsampling points ``1..num_points``.

    Call as ``model.apply(variables, images, instance=Instance(...), train=bool,
    mutable=...)`` with ``images`` ``(B, H, W, 3)``; returns float32 logits
    ``(B, num_classes)``. ``instance`` must be static under ``jit`` (each instance is
    its own XLA program). ``init`` creates the batch-norm statistics of every instance.
    Architectures with ``supports_low_mode`` also take ``low_mode=LowMode(...)`` (static,
    another XLA program): the same parameters run in low mode (:mod:`sdpoint_jax.core.lowmode`).

    Attributes:
      num_classes: classifier outputs.
      ratios: SDPoint downsampling ratios ``R``.
      bn_mode: ``"instance"`` (per-instance BN statistics) or ``"uniform"`` (UBN).
      bn_axis_name: mapped axis to average BN batch statistics over (``shard_map``).
      bn_momentum: BN running-statistics momentum (0.9 = PyTorch's 0.1).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.

    How convolutions are lowered is decided where a program is built, not by the model
    (:mod:`sdpoint_jax.core.convolution`).
    """

    num_classes: int = 10
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    bn_mode: str = "instance"
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    supports_low_mode: ClassVar[bool] = False
    """Whether ``__call__`` takes ``low_mode`` (the architecture marks the convolutions
    whose kernels low mode downsamples)."""

    @property
    def num_points(self) -> int:
        """``N``: the number of SDPoint downsampling points."""
        raise NotImplementedError

    @property
    def space(self) -> InstanceSpace:
        return InstanceSpace(self.num_points, self.ratios)

    def check_low_mode(self, low_mode: LowMode | None) -> None:
        """``ValueError`` if ``low_mode`` is set and this architecture has no low mode."""
        if low_mode is not None and not self.supports_low_mode:
            raise ValueError(
                f"{type(self).__name__} has no low mode (it is implemented for WRN and "
                f"ResNet/PreResNet/ResNeXt, the residual networks of the low-mode paper)"
            )

    def context(
        self, instance: Instance, train: bool, low_mode: LowMode | None = None
    ) -> SDPointContext:
        self.check_low_mode(low_mode)
        return SDPointContext(
            instance=instance,
            space=self.space,
            train=train,
            bn_mode=self.bn_mode,
            bn_axis_name=self.bn_axis_name,
            bn_momentum=self.bn_momentum,
            dtype=self.dtype,
            low_mode=low_mode,
        )

    def head(self, x: jax.Array) -> jax.Array:
        """Global average pool (any spatial size) and linear classifier."""
        x = GlobalAvgPool()(x)
        return classifier(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
