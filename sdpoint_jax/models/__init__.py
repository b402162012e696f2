"""Model registry: ``create("wrn-28-10", num_classes=100)``.

Names (case-insensitive):

* ``wrn-D-W``               Wide ResNet (CIFAR), e.g. ``wrn-28-10``, ``wrn-40-4``, ``wrn-16-1``
* ``densenet-bc-D-G``       DenseNet-BC (CIFAR), e.g. ``densenet-bc-40-60``
* ``vgg-D``                 VGG-D-BN (CIFAR), D in 11/13/16/19
* ``resnet-D``              ResNet (ImageNet), D in 18/34/50/101/152/200
* ``preresnet-D``           pre-activation ResNet (ImageNet), same depths
* ``resnext-D-CxWd``        ResNeXt (ImageNet), e.g. ``resnext-101-32x4d``
* ``msdnet-K[-OPTIONS]``    MSDNet with K exits (CIFAR, 3 scales), e.g. ``msdnet-7``
* ``msdnet-imagenet-K[-OPTIONS]``  MSDNet with K exits (ImageNet, 4 scales)

MSDNet options (:func:`sdpoint_jax.models.msdnet.parse_options`) override the setting's
``stepmode`` (``-even``, ``-lin_grow``), ``step`` (``-step2``), ``base`` (``-base4``),
``nChannels`` (``-ch16``) and ``growthRate`` (``-gr6``). MSDNet is a network with exits
(:class:`~sdpoint_jax.models.msdnet.MSDNet`), not an SDPoint model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from sdpoint_jax.models.base import SDPointModel
from sdpoint_jax.models.densenet import DenseNetBC
from sdpoint_jax.models.msdnet import MSDNet, msdnet, parse_options
from sdpoint_jax.models.preresnet import PreResNet
from sdpoint_jax.models.resnet import ResNet
from sdpoint_jax.models.resnext import resnext
from sdpoint_jax.models.vgg import VGG
from sdpoint_jax.models.wrn import WideResNet


@dataclasses.dataclass(frozen=True)
class TrainingDefaults:
    """An architecture's default optimisation hyper-parameters (its paper's setting)."""

    batch_size: int
    weight_decay: float
    lr_decay: float  # factor of each learning-rate drop


_CIFAR_RESNET = TrainingDefaults(batch_size=128, weight_decay=5e-4, lr_decay=0.2)
_DENSENET = TrainingDefaults(batch_size=64, weight_decay=1e-4, lr_decay=0.1)
_IMAGENET = TrainingDefaults(batch_size=256, weight_decay=1e-4, lr_decay=0.1)

_MSDNET_OPTIONS = r"((?:-(?:even|lin_grow|[a-z]+\d+))*)"

_REGISTRY: tuple[tuple[str, Callable[..., SDPointModel | MSDNet], TrainingDefaults], ...] = (
    (
        r"wrn-(\d+)-(\d+)",
        lambda d, w, **kw: WideResNet(depth=int(d), width=int(w), **kw),
        _CIFAR_RESNET,
    ),
    (
        r"densenet-bc-(\d+)-(\d+)",
        lambda d, g, **kw: DenseNetBC(depth=int(d), growth=int(g), **kw),
        _DENSENET,
    ),
    (r"vgg-(\d+)", lambda d, **kw: VGG(depth=int(d), **kw), _CIFAR_RESNET),
    (r"resnet-(\d+)", lambda d, **kw: ResNet(depth=int(d), **kw), _IMAGENET),
    (r"preresnet-(\d+)", lambda d, **kw: PreResNet(depth=int(d), **kw), _IMAGENET),
    (
        r"resnext-(\d+)-(\d+)x(\d+)d",
        lambda d, c, w, **kw: resnext(int(d), int(c), int(w), **kw),
        _IMAGENET,
    ),
    (
        r"msdnet-imagenet-(\d+)" + _MSDNET_OPTIONS,
        lambda k, o, **kw: msdnet(int(k), imagenet=True, **parse_options(o), **kw),
        _IMAGENET,
    ),
    (
        r"msdnet-(\d+)" + _MSDNET_OPTIONS,
        lambda k, o, **kw: msdnet(int(k), **parse_options(o), **kw),
        _DENSENET,  # IMTA's CIFAR setting: batch 64, weight decay 1e-4, x0.1
    ),
)
"""Per architecture family: name pattern, builder, default training hyper-parameters."""

PAPER_MODELS = (
    "wrn-28-10",
    "wrn-40-4",
    "densenet-bc-40-60",
    "preresnet-101",
    "resnext-101-32x4d",
)
"""The architectures evaluated in the SDPoint paper."""


def _lookup(name: str) -> tuple[re.Match, Callable[..., SDPointModel], TrainingDefaults]:
    key = name.strip().lower()
    for pattern, build, defaults in _REGISTRY:
        match = re.fullmatch(pattern, key)
        if match:
            return match, build, defaults
    raise ValueError(
        f"unknown model {name!r}; expected one of: wrn-D-W, densenet-bc-D-G, vgg-D, "
        f"resnet-D, preresnet-D, resnext-D-CxWd, msdnet-K, msdnet-imagenet-K "
        f"(e.g. {', '.join(PAPER_MODELS)}, msdnet-7)"
    )


def create(name: str, **kwargs: Any) -> SDPointModel | MSDNet:
    """Builds a model by name; ``kwargs`` are model fields (``num_classes``, ``ratios``,
    ``bn_mode``, ``dtype``, ``stem_point`` for ImageNet nets, ...; MSDNet takes
    ``num_classes``, ``dtype``, ``ge``, ``isc`` and its hyper-parameters).

    The architecture is validated eagerly (e.g. an impossible depth raises here).
    """
    match, build, _ = _lookup(name)
    model = build(*match.groups(), **kwargs)
    if isinstance(model, SDPointModel):
        model.space  # noqa: B018 - validates depth/width and ratios now
    return model


def has_exits(model: Any) -> bool:
    """Whether ``model`` is a network with exits (``num_exits``, ``up_to``)."""
    return isinstance(model, MSDNet)


def training_defaults(name: str) -> TrainingDefaults:
    """The default batch size, weight decay and learning-rate decay of the architecture
    ``name`` (WRN and VGG: 128, 5e-4, x0.2; DenseNet-BC: 64, 1e-4, x0.1; the ImageNet
    ResNet, PreResNet and ResNeXt: 256, 1e-4, x0.1; MSDNet: IMTA's, 64 on CIFAR and 256
    on ImageNet, 1e-4, x0.1). ``ValueError`` for an unknown name."""
    return _lookup(name)[2]


__all__ = [
    "PAPER_MODELS",
    "VGG",
    "DenseNetBC",
    "MSDNet",
    "PreResNet",
    "ResNet",
    "SDPointModel",
    "TrainingDefaults",
    "WideResNet",
    "create",
    "has_exits",
    "resnext",
    "training_defaults",
]
