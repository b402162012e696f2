"""DenseNet-BC-d-g for CIFAR (Huang et al., 2017).

Stem 3x3 conv (``2g`` channels), three dense blocks of ``n = (d - 4) / 6`` bottleneck
layers (BN-ReLU-conv1x1(4g)-BN-ReLU-conv3x3(g), output concatenated to the input),
transitions BN-ReLU-conv1x1(compress 0.5)-avgpool 2x2, then BN-ReLU, global average
pool and a linear classifier.

SDPoint points sit right after a dense layer's concatenation (paper Sect. 4.2). Rule:
**every concatenation of every dense block that is followed by a transition**, i.e.
all blocks but the last, so ``N = 2n``: 12 for DenseNet-BC-40-60, the paper's count.
The last block's maps (8x8 on CIFAR) feed the classifier directly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import Pool, Relu
from sdpoint_jax.core.points import SDPointContext
from sdpoint_jax.models.base import SDPointModel

NUM_BLOCKS = 3


class DenseLayer(nn.Module):
    """Bottleneck dense layer; returns ``concat([x, new_features])``."""

    growth: int
    index: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = Relu()(self.ctx.norm(self.index, name="bn1")(x))
        y = self.ctx.conv(4 * self.growth, 1, name="conv1")(y)
        y = Relu()(self.ctx.norm(self.index, name="bn2")(y))
        y = self.ctx.conv(self.growth, 3, name="conv2")(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 to ``features``, then 2x2 average pooling."""

    features: int
    index: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = Relu()(self.ctx.norm(self.index, name="bn")(x))
        y = self.ctx.conv(self.features, 1, name="conv")(y)
        return Pool("avg", window=2, stride=2)(y)


class DenseNetBC(SDPointModel, kw_only=True):
    """DenseNet-BC-``depth``-``growth`` with compression 0.5; ``depth = 6n + 4``."""

    depth: int
    growth: int
    compression: float = 0.5

    @property
    def layers_per_block(self) -> int:
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {self.depth}")
        return (self.depth - 4) // 6

    @property
    def num_points(self) -> int:
        return (NUM_BLOCKS - 1) * self.layers_per_block

    @nn.compact
    def __call__(self, x: jax.Array, *, instance: Instance, train: bool) -> jax.Array:
        ctx = self.context(instance, train)
        x = ctx.conv(2 * self.growth, 3, name="stem")(x.astype(self.dtype))
        passed = 0  # points passed so far; a layer belongs to block ``passed + 1``
        for block in range(NUM_BLOCKS):
            has_points = block < NUM_BLOCKS - 1
            for layer in range(self.layers_per_block):
                name = f"dense{block + 1}_{layer + 1}"
                x = DenseLayer(self.growth, passed + 1, ctx, name=name)(x)
                if has_points:
                    passed += 1
                    x = ctx.point(x, passed)
            if has_points:
                features = int(x.shape[-1] * self.compression)
                x = Transition(features, passed + 1, ctx, name=f"transition{block + 1}")(x)
        x = Relu()(ctx.norm(passed + 1, name="final_bn")(x))
        return self.head(x)
