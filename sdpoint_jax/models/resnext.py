"""ResNeXt (Xie et al., 2017): the bottleneck ResNet with a grouped 3x3 convolution.

ResNeXt-``d``-``C``x``D``d has ``C`` groups of ``D`` channels at the first stage
(``floor(planes * D / 64) * C`` channels in general); points as in :mod:`.resnet`
(after the residual addition, before the final ReLU).
"""

from __future__ import annotations

from typing import Any

from sdpoint_jax.models.resnet import ResNet


def resnext(depth: int, cardinality: int = 32, group_width: int = 4, **kwargs: Any) -> ResNet:
    """ResNeXt-``depth`` (50/101/152) with ``cardinality x group_width``d groups."""
    if depth < 50:
        raise ValueError(f"ResNeXt needs bottleneck blocks (depth >= 50), got depth {depth}")
    return ResNet(depth=depth, groups=cardinality, width_per_group=group_width, **kwargs)
