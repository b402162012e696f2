"""Wide ResNet WRN-d-w for CIFAR (Zagoruyko & Komodakis, 2016), pre-activation.

Stem 3x3 conv (16), three stages of ``n = (d - 4) / 6`` basic blocks with
``16w, 32w, 64w`` channels (stride 2 at the first block of stages 2 and 3), then
BN-ReLU, global average pool and a linear classifier. Every block is one SDPoint
point, right after its residual addition: ``N = 3n`` (12 for WRN-28-10, 18 for
WRN-40-4).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from sdpoint_jax.instance import Instance
from sdpoint_jax.models.base import SDPointModel
from sdpoint_jax.models.layers import Add, Relu
from sdpoint_jax.points import SDPointContext


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut; a 1x1 conv on the pre-activated
    input where the shape changes (as in the reference WRN code)."""

    features: int
    stride: int
    index: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        preact = Relu()(self.ctx.norm(self.index, name="bn1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = self.ctx.conv(self.features, 1, self.stride, name="shortcut")(preact)
        y = self.ctx.conv(self.features, 3, self.stride, name="conv1")(preact)
        y = Relu()(self.ctx.norm(self.index, name="bn2")(y))
        y = self.ctx.conv(self.features, 3, name="conv2")(y)
        return Add()(y, shortcut)


class WideResNet(SDPointModel, kw_only=True):
    """WRN-``depth``-``width``; ``depth = 6n + 4``."""

    depth: int
    width: int

    @property
    def blocks_per_stage(self) -> int:
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {self.depth}")
        return (self.depth - 4) // 6

    @property
    def num_points(self) -> int:
        return 3 * self.blocks_per_stage

    @nn.compact
    def __call__(self, x: jax.Array, *, instance: Instance, train: bool) -> jax.Array:
        ctx = self.context(instance, train)
        x = ctx.conv(16, 3, name="stem")(x.astype(self.dtype))
        index = 0
        for stage, base in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
                index += 1
                stride = 2 if stage > 0 and block == 0 else 1
                x = PreActBasicBlock(base * self.width, stride, index, ctx, name=f"block{index}")(x)
                x = ctx.point(x, index)
        x = Relu()(ctx.norm(index + 1, name="final_bn")(x))
        return self.head(x)
