"""The ImageNet residual-network skeleton shared by ResNet, ResNeXt and PreResNet.

Stem: 7x7/2 conv (64) - BN - ReLU - 3x3/2 max pool, then four stages of residual
blocks (64, 128, 256, 512 base channels; stride 2 at the first block of stages 2-4,
on the 3x3 conv), then the architecture's head. With ``stem_point=True`` (default,
as in the authors' code) the stem carries SDPoint point 1: the 3x3/2 max pool is
replaced by adaptive max pooling to ``round(r * size after the max pool)``; the
residual blocks are points ``2..N``. Otherwise the blocks are points ``1..N``.

Low mode (:mod:`sdpoint_jax.core.lowmode`, ``low_mode=LowMode(r)``), as the low-mode paper
(003, Sect. 4) runs ResNet-18/50: the input is downsampled by ``r``, the block's 3x3
convolutions (both of a basic block, the middle one of a bottleneck) run with
average-pooled kernels, and the stem's max pool is dropped (item 5: "only in
low-mode"; with ``stem_point`` the point then pools the stem's output directly). The
7x7 stem conv, the 1x1 convs and the classifier are unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import Pool, Relu
from sdpoint_jax.core.lowmode import LowMode
from sdpoint_jax.core.points import SDPointContext
from sdpoint_jax.models.base import SDPointModel

# depth -> (block type, blocks per stage)
STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def bottleneck_width(planes: int, groups: int, width_per_group: int) -> int:
    """Channels of a bottleneck's 3x3 conv: ``floor(planes * width_per_group / 64) *
    groups`` (ResNet: ``planes``; ResNeXt-32x4d: ``128`` at ``planes = 64``)."""
    return (planes * width_per_group // 64) * groups


ConvSpec = tuple[int, int, int, int]  # (features, kernel, stride, groups)


def block_convs(
    planes: int, stride: int, groups: int, width_per_group: int, bottleneck: bool
) -> tuple[int, tuple[ConvSpec, ...]]:
    """Output channels and conv layers of a basic (two 3x3) or bottleneck block
    (1x1, 3x3 with stride and groups, 1x1 to ``4 * planes``)."""
    if not bottleneck:
        return planes, ((planes, 3, stride, 1), (planes, 3, 1, 1))
    width = bottleneck_width(planes, groups, width_per_group)
    out = planes * EXPANSION["bottleneck"]
    return out, ((width, 1, 1, 1), (width, 3, stride, groups), (out, 1, 1, 1))


class ResidualBlock(nn.Module):
    """Fields of a residual block (basic or bottleneck) ending at point ``index``."""

    planes: int
    stride: int
    index: int
    ctx: SDPointContext
    groups: int = 1
    width_per_group: int = 64
    bottleneck: bool = False

    @property
    def convs(self) -> tuple[int, tuple[ConvSpec, ...]]:
        """Output channels and conv layers, see :func:`block_convs`."""
        return block_convs(
            self.planes, self.stride, self.groups, self.width_per_group, self.bottleneck
        )


class Shortcut(nn.Module):
    """1x1 conv (with stride) + BN, where a block changes shape; else identity."""

    features: int
    stride: int
    index: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stride == 1 and x.shape[-1] == self.features:
            return x
        x = self.ctx.conv(self.features, 1, self.stride, name="conv")(x)
        return self.ctx.norm(self.index, name="bn")(x)


class ResidualNet(SDPointModel, kw_only=True):
    """Subclasses provide ``block``, a module class taking ``(planes, stride, index,
    ctx, groups, width_per_group, bottleneck)``, and ``head_norm`` (pre-activation
    nets end with BN-ReLU before pooling)."""

    depth: int
    groups: int = 1
    width_per_group: int = 64
    stem_point: bool = True

    block: ClassVar[type[ResidualBlock]]
    head_norm: ClassVar[bool]
    supports_low_mode = True

    @property
    def stages(self) -> tuple[str, tuple[int, int, int, int]]:
        if self.depth not in STAGES:
            raise ValueError(f"depth must be one of {sorted(STAGES)}, got {self.depth}")
        block_type, counts = STAGES[self.depth]
        if block_type == "basic" and (self.groups, self.width_per_group) != (1, 64):
            raise ValueError(f"depth {self.depth} uses basic blocks, which have no groups")
        return block_type, counts

    @property
    def num_points(self) -> int:
        return int(self.stem_point) + sum(self.stages[1])

    @nn.compact
    def __call__(
        self, x: jax.Array, *, instance: Instance, train: bool, low_mode: LowMode | None = None
    ) -> jax.Array:
        ctx = self.context(instance, train, low_mode)
        x = ctx.conv(64, 7, 2, name="stem_conv")(ctx.input(x).astype(self.dtype))
        x = Relu()(ctx.norm(1, name="stem_bn")(x))
        # low mode drops the stem's max pool (paper 003, Sect. 4, item 5)
        max_pool = None if low_mode is not None else Pool("max", window=3, stride=2, padding=1)
        index = int(self.stem_point)
        if self.stem_point:
            x = ctx.point(x, index, replaces=max_pool)
        elif max_pool is not None:
            x = max_pool(x)
        block_type, counts = self.stages
        for stage, (planes, count) in enumerate(zip(STAGE_PLANES, counts, strict=True)):
            for block in range(count):
                index += 1
                stride = 2 if stage > 0 and block == 0 else 1
                x = self.block(
                    planes,
                    stride,
                    index,
                    ctx,
                    self.groups,
                    self.width_per_group,
                    block_type == "bottleneck",
                    name=f"block{index}",
                )(x)
        if self.head_norm:
            x = Relu()(ctx.norm(index + 1, name="final_bn")(x))
        return self.head(x)
