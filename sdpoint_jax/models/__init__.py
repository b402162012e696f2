"""Model registry: ``create("wrn-28-10", num_classes=100)``.

Names (case-insensitive):

* ``wrn-D-W``               Wide ResNet (CIFAR), e.g. ``wrn-28-10``, ``wrn-40-4``, ``wrn-16-1``
* ``densenet-bc-D-G``       DenseNet-BC (CIFAR), e.g. ``densenet-bc-40-60``
* ``vgg-D``                 VGG-D-BN (CIFAR), D in 11/13/16/19
* ``resnet-D``              ResNet (ImageNet), D in 18/34/50/101/152/200
* ``preresnet-D``           pre-activation ResNet (ImageNet), same depths
* ``resnext-D-CxWd``        ResNeXt (ImageNet), e.g. ``resnext-101-32x4d``
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sdpoint_jax.models.base import SDPointModel
from sdpoint_jax.models.densenet import DenseNetBC
from sdpoint_jax.models.preresnet import PreResNet
from sdpoint_jax.models.resnet import ResNet
from sdpoint_jax.models.resnext import resnext
from sdpoint_jax.models.vgg import VGG
from sdpoint_jax.models.wrn import WideResNet

_PATTERNS: tuple[tuple[str, Callable[..., SDPointModel]], ...] = (
    (r"wrn-(\d+)-(\d+)", lambda d, w, **kw: WideResNet(depth=int(d), width=int(w), **kw)),
    (r"densenet-bc-(\d+)-(\d+)", lambda d, g, **kw: DenseNetBC(depth=int(d), growth=int(g), **kw)),
    (r"vgg-(\d+)", lambda d, **kw: VGG(depth=int(d), **kw)),
    (r"resnet-(\d+)", lambda d, **kw: ResNet(depth=int(d), **kw)),
    (r"preresnet-(\d+)", lambda d, **kw: PreResNet(depth=int(d), **kw)),
    (r"resnext-(\d+)-(\d+)x(\d+)d", lambda d, c, w, **kw: resnext(int(d), int(c), int(w), **kw)),
)

PAPER_MODELS = (
    "wrn-28-10",
    "wrn-40-4",
    "densenet-bc-40-60",
    "preresnet-101",
    "resnext-101-32x4d",
)
"""The architectures evaluated in the SDPoint paper."""


def create(name: str, **kwargs: Any) -> SDPointModel:
    """Builds a model by name; ``kwargs`` are model fields (``num_classes``, ``ratios``,
    ``bn_mode``, ``dtype``, ``stem_point`` for ImageNet nets, ...).

    The architecture is validated eagerly (e.g. an impossible depth raises here).
    """
    key = name.strip().lower()
    for pattern, build in _PATTERNS:
        match = re.fullmatch(pattern, key)
        if match:
            model = build(*match.groups(), **kwargs)
            model.space  # noqa: B018 - validates depth/width and ratios now
            return model
    raise ValueError(
        f"unknown model {name!r}; expected one of: wrn-D-W, densenet-bc-D-G, vgg-D, "
        f"resnet-D, preresnet-D, resnext-D-CxWd (e.g. {', '.join(PAPER_MODELS)})"
    )


__all__ = [
    "PAPER_MODELS",
    "VGG",
    "DenseNetBC",
    "PreResNet",
    "ResNet",
    "SDPointModel",
    "WideResNet",
    "create",
    "resnext",
]
