"""Pre-activation ResNet (He et al., ECCV 2016) for ImageNet, as in the authors' code.

Blocks are BN-ReLU-conv; the projection shortcut (1x1 conv + BN) reads the
pre-activated input. The SDPoint point of a block sits right after its residual
addition. The network ends with BN-ReLU before global pooling.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from sdpoint_jax.core.layers import Add, Relu
from sdpoint_jax.models.residual import ResidualBlock, ResidualNet, Shortcut


class PreActBlock(ResidualBlock):
    """(BN-ReLU-conv)* plus shortcut; then the point."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ctx = self.ctx
        out, convs = self.convs
        preact = Relu()(ctx.norm(self.index, name="bn1")(x))
        y = preact
        for number, (features, kernel, stride, groups) in enumerate(convs, start=1):
            if number > 1:
                y = Relu()(ctx.norm(self.index, name=f"bn{number}")(y))
            y = ctx.conv(
                features,
                kernel,
                stride,
                groups=groups,
                low_mode_eligible=kernel == 3,  # the block's 3x3 convs (paper 003, Sect. 4)
                name=f"conv{number}",
            )(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out:
            shortcut = Shortcut(out, self.stride, self.index, ctx, name="shortcut")(preact)
        return ctx.point(Add()(y, shortcut), self.index)


class PreResNet(ResidualNet, kw_only=True):
    """PreResNet-``depth`` (18/34/50/101/152/200)."""

    block = PreActBlock
    head_norm = True
