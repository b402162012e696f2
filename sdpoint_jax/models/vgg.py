"""VGG-BN for CIFAR (Simonyan & Zisserman, 2015; CIFAR variant with BN).

Each conv3x3-BN-ReLU block is one SDPoint point (paper Sect. 4.2: the basic building
block of a non-residual net), so VGG-16 has ``N = 13``. The 2x2/2 max pools use
PyTorch's ``ceil_mode=True`` so that a downsampled odd-sized map never shrinks to 0
pixels (identical to floor mode on the unmodified network's even sizes). After the
last pool, a global average pool (1x1 on the unmodified 32x32 network) feeds a linear
classifier.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import Pool, Relu
from sdpoint_jax.models.base import SDPointModel

POOL = "M"
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL)
    + (512, 512, 512, POOL),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL)
    + (512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL),
}


class VGG(SDPointModel, kw_only=True):
    """VGG-``depth``-BN (depth in 11, 13, 16, 19)."""

    depth: int = 16

    @property
    def layout(self) -> tuple[int | str, ...]:
        if self.depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {self.depth}")
        return CONFIGS[self.depth]

    @property
    def num_points(self) -> int:
        return sum(1 for item in self.layout if item != POOL)

    @nn.compact
    def __call__(self, x: jax.Array, *, instance: Instance, train: bool) -> jax.Array:
        ctx = self.context(instance, train)
        x = x.astype(self.dtype)
        index = 0
        for item in self.layout:
            if item == POOL:
                x = Pool("max", window=2, stride=2, ceil_mode=True)(x)
                continue
            index += 1
            x = ctx.conv(item, 3, use_bias=True, name=f"conv{index}")(x)
            x = Relu()(ctx.norm(index, name=f"bn{index}")(x))
            x = ctx.point(x, index)
        return self.head(x)
