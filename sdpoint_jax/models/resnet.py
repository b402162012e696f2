"""ResNet (He et al., 2016), post-activation, ImageNet; ResNeXt is in ``resnext.py``.

The SDPoint point of a block sits after the residual addition and **before** the
block's final ReLU, as in the authors' released code.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from sdpoint_jax.core.layers import Add, Relu
from sdpoint_jax.models.residual import ResidualBlock, ResidualNet, Shortcut


class PostActBlock(ResidualBlock):
    """(conv-BN-ReLU)* conv-BN, plus shortcut; then the point, then ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ctx = self.ctx
        out, convs = self.convs
        y = x
        for number, (features, kernel, stride, groups) in enumerate(convs, start=1):
            if number > 1:
                y = Relu()(y)
            y = ctx.conv(
                features,
                kernel,
                stride,
                groups=groups,
                low_mode_eligible=kernel == 3,  # the block's 3x3 convs (paper 003, Sect. 4)
                name=f"conv{number}",
            )(y)
            y = ctx.norm(self.index, name=f"bn{number}")(y)
        shortcut = Shortcut(out, self.stride, self.index, ctx, name="shortcut")(x)
        y = ctx.point(Add()(y, shortcut), self.index)
        return Relu()(y)


class ResNet(ResidualNet, kw_only=True):
    """ResNet-``depth`` (18/34/50/101/152/200); grouped (ResNeXt) with ``groups > 1``."""

    block = PostActBlock
    head_norm = False
