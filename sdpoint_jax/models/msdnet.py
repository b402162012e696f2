"""MSDNet, the multi-scale dense network of Huang et al. (ICLR 2018), in Flax.

The network keeps ``S`` scales of features at once (CIFAR: 32x32, 16x16, 8x8;
ImageNet: 56x56 .. 7x7). Layout, as in the authors' and IMTA's code
(``--prune max --reduction 0.5 --bottleneck``, the defaults of both):

* *first layer*: one ``ConvBasic`` (conv-BN-ReLU) per scale; scale 0 is a 3x3/1
  convolution of the image (ImageNet: 7x7/2 convolution with bias, BN, ReLU and a
  3x3/2 max pool), every coarser scale a 3x3/2 convolution of the finer one. Scale
  ``s`` has ``nChannels * grFactor[s]`` channels.
* *dense layers*: every layer adds ``growthRate * grFactor[s]`` channels at each scale
  it keeps, concatenated to its input (dense connectivity): at the finest kept scale a
  3x3 convolution of that scale; at every coarser scale half from a 3x3/2 convolution
  of the finer scale and half from a 3x3 convolution of the same scale. Each
  convolution is preceded by a 1x1 bottleneck of ``min(C_in, bnFactor * C_out)``
  channels and followed by BN-ReLU.
* *scale pruning and transitions* (``prune max``): the network's ``L`` layers are cut
  into ``S`` runs of ``ceil(L / S)``; the first layer of every later run drops the
  finest scale, and after such a layer a *transition* (1x1 ``ConvBasic`` per scale)
  shrinks every scale to ``floor(reduction * C)`` base channels.
* *blocks*: block 1 has ``base`` layers, block ``b >= 2`` has ``step`` layers
  (``stepmode="even"``) or ``step * (b - 1) + 1`` (``"lin_grow"``).
* *classifiers*: one after every block, on the coarsest scale: two 3x3/2
  ``ConvBasic`` (CIFAR: 128 channels; ImageNet: as many as their input), a 2x2 average
  pool and a linear layer (``exit{i}/linear``: "the last layer" of the classifier).

Batch norm: as :class:`~sdpoint_jax.models.early_exit.EarlyExitWRN`, through an
:class:`~sdpoint_jax.core.points.SDPointContext` of the full instance in a space
without points, so every BN layer keys its running statistics ``"full"``.

Training techniques of IMTA (Li et al., ICCV 2019), as switches:

* ``ge``: Gradient Equilibrium at the dense path the classifiers read, as the authors'
  ``msdnet_ge.py`` places it: after block ``i`` the coarsest scale splits
  (:func:`~sdpoint_jax.models.early_exit.ge_split`) into classifier ``i``'s input
  (gradient scaled by ``1 / (k - i + 1)``) and block ``i + 1``'s (by
  ``(k - i) / (k - i + 1)``). The finer scales pass unscaled, as there.
* ``isc``: Inline Subnetwork Collaboration with the identity transfer of the paper,
  ``logits_i = own_i + stop_gradient(logits_{i-1})`` (as in
  :mod:`sdpoint_jax.models.early_exit`; the authors' code learns a Linear-BN-ReLU of
  the previous logits and concatenates it to the classifier's features instead).

Call as :class:`~sdpoint_jax.models.early_exit.EarlyExitWRN`:
``model.apply(variables, images, train=bool, up_to=None | i, cascade=bool)``.
Exit ``i`` needs blocks ``1..i`` whole and classifier ``i``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sdpoint_jax.core.layers import Add, Pool, Relu, classifier
from sdpoint_jax.core.norm import FIRST_BLOCK
from sdpoint_jax.core.points import SDPointContext
from sdpoint_jax.models.early_exit import check_exit, full_network_context, ge_split

STEP_MODES = ("even", "lin_grow")
CIFAR_CLASSIFIER_CHANNELS = 128


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One dense layer: the scales it reads and writes (counted from the coarsest),
    and the base channel count of the transition after it (None: no transition)."""

    in_scales: int
    out_scales: int
    transition: int | None


class ConvBasic(nn.Module):
    """Convolution (``kernel x kernel``, ``stride``, no bias), BN, ReLU."""

    features: int
    kernel: int
    stride: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ctx.conv(self.features, self.kernel, self.stride, name="conv")(x)
        return Relu()(self.ctx.norm(FIRST_BLOCK, name="bn")(x))


class BottleneckConv(nn.Module):
    """1x1 bottleneck to ``min(C_in, width * features)`` channels (conv-BN-ReLU), then
    a 3x3 ``ConvBasic`` of stride ``stride`` to ``features`` (the authors' ``ConvBN``)."""

    features: int
    width: int
    stride: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = min(x.shape[-1], self.width * self.features)
        x = ConvBasic(inner, 1, 1, self.ctx, name="bottleneck")(x)
        return ConvBasic(self.features, 3, self.stride, self.ctx, name="conv3")(x)


class ScaleUnit(nn.Module):
    """One scale of a dense layer: ``(same (B, H, W, C), finer (B, 2H, 2W, C') | None)``
    -> ``concat[same, down(finer), normal(same)]`` with ``growth`` new channels (half
    from each path when ``finer`` is given)."""

    growth: int
    down_width: int
    normal_width: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, same: jax.Array, finer: jax.Array | None) -> jax.Array:
        if finer is None:
            new = BottleneckConv(self.growth, self.normal_width, 1, self.ctx, name="normal")(same)
            return jnp.concatenate([same, new], axis=-1)
        half = self.growth // 2
        down = BottleneckConv(half, self.down_width, 2, self.ctx, name="down")(finer)
        normal = BottleneckConv(half, self.normal_width, 1, self.ctx, name="normal")(same)
        return jnp.concatenate([same, down, normal], axis=-1)


class ExitClassifier(nn.Module):
    """Two 3x3/2 ``ConvBasic`` of ``channels`` (None: the input's), 2x2 average pool,
    flatten, linear (``linear``). ``(B, H, W, C)`` -> float32 ``(B, num_classes)``."""

    num_classes: int
    channels: int | None
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = self.channels or x.shape[-1]
        x = ConvBasic(channels, 3, 2, self.ctx, name="conv1")(x)
        x = ConvBasic(channels, 3, 2, self.ctx, name="conv2")(x)
        x = Pool("avg", 2, 2)(x)
        x = x.reshape(x.shape[0], -1)
        return classifier(self.num_classes, dtype=self.ctx.dtype, name="linear")(x).astype(
            jnp.float32
        )


class MSDNet(nn.Module, kw_only=True):
    """MSDNet with ``num_blocks`` exits (module docstring).

    Attributes:
      num_blocks: ``nBlocks``, the number of blocks and exits ``k``.
      step, base, stepmode: layers per block (``base`` for block 1, then ``step``
        each (``"even"``) or ``step * (b - 1) + 1`` (``"lin_grow"``)).
      channels: ``nChannels``, base channels of the first layer.
      growth: ``growthRate``, base channels each dense layer adds.
      gr_factor, bn_factor: per scale, the channel and bottleneck-width factors; their
        length is the number of scales ``S``.
      reduction: transition compression (``floor(reduction * C)``), 0 for none.
      imagenet: the ImageNet stem and classifiers (else CIFAR's).
      num_classes: classifier outputs.
      ge, isc: IMTA's Gradient Equilibrium and Inline Subnetwork Collaboration.
      bn_axis_name, bn_momentum, dtype: as in
        :class:`~sdpoint_jax.models.base.SDPointModel`.
    """

    num_blocks: int
    step: int
    base: int
    stepmode: str = "even"
    channels: int = 16
    growth: int = 6
    gr_factor: tuple[int, ...] = (1, 2, 4)
    bn_factor: tuple[int, ...] = (1, 2, 4)
    reduction: float = 0.5
    imagenet: bool = False
    num_classes: int = 10
    ge: bool = False
    isc: bool = False
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @property
    def num_scales(self) -> int:
        return len(self.gr_factor)

    @property
    def num_exits(self) -> int:
        return self.num_blocks

    @property
    def block_steps(self) -> tuple[int, ...]:
        """Dense layers per block; validates every hyper-parameter."""
        self._validate()
        if self.stepmode == "even":
            return (self.base, *([self.step] * (self.num_blocks - 1)))
        return (self.base, *(self.step * b + 1 for b in range(1, self.num_blocks)))

    def _validate(self) -> None:
        checks = (
            (self.num_blocks >= 1, f"nBlocks must be >= 1, got {self.num_blocks}"),
            (self.base >= 1, f"base must be >= 1, got {self.base}"),
            (self.step >= 1, f"step must be >= 1, got {self.step}"),
            (
                self.stepmode in STEP_MODES,
                f"stepmode must be one of {STEP_MODES}, got {self.stepmode!r}",
            ),
            (self.channels >= 1, f"nChannels must be >= 1, got {self.channels}"),
            (self.growth >= 1, f"growthRate must be >= 1, got {self.growth}"),
            (
                len(self.gr_factor) == len(self.bn_factor) >= 1,
                f"grFactor and bnFactor need one entry per scale, got "
                f"{self.gr_factor} and {self.bn_factor}",
            ),
            (
                all(f >= 1 for f in (*self.gr_factor, *self.bn_factor)),
                f"grFactor and bnFactor must be >= 1, got {self.gr_factor}, {self.bn_factor}",
            ),
            (
                all(self.growth * f % 2 == 0 for f in self.gr_factor[1:]),
                f"growthRate * grFactor must be even at every scale but the finest "
                f"(two halves), got {self.growth} * {self.gr_factor}",
            ),
            (0.0 <= self.reduction <= 1.0, f"reduction must lie in [0, 1], got {self.reduction}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def plan(self) -> tuple[tuple[LayerPlan, ...], ...]:
        """Per block, its dense layers (``prune max``, module docstring)."""
        steps = self.block_steps
        total = sum(steps)
        scales = self.num_scales
        interval = math.ceil(total / scales)
        base_channels = self.channels
        layer = 0
        blocks = []
        for count in steps:
            layers = []
            for _ in range(count):
                layer += 1
                in_scales = scales - max(0, layer - 2) // interval
                out_scales = scales - (layer - 1) // interval
                base_channels += self.growth
                transition = None
                if in_scales > out_scales and self.reduction > 0:
                    transition = math.floor(self.reduction * base_channels)
                    base_channels = transition
                layers.append(LayerPlan(in_scales, out_scales, transition))
            blocks.append(tuple(layers))
        return tuple(blocks)

    @nn.nowrap
    def exit_scopes(self, exit: int) -> tuple[str, ...]:
        """The top-level modules that end exit ``exit``: its classifier and ISC."""
        return (f"exit{exit}", f"isc{exit}")

    def context(self, train: bool) -> SDPointContext:
        return full_network_context(self, train)

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool,
        up_to: int | None = None,
        cascade: bool = False,
    ) -> jax.Array | list[jax.Array]:
        k = self.num_exits
        last = k if up_to is None else up_to
        check_exit(last, k)
        every = up_to is None or cascade or self.isc
        ctx = self.context(train)
        xs = self._first_layer(ctx, images.astype(self.dtype))
        outputs: list[jax.Array] = []
        layer = 0
        for i, block in enumerate(self.plan, start=1):
            for spec in block:
                layer += 1
                xs = self._dense_layer(ctx, xs, spec, layer)
            to_exit = xs[-1]
            if self.ge:
                to_exit, coarsest = ge_split(xs[-1], i, k)
                xs = [*xs[:-1], coarsest]
            if not (every or i == last):
                continue
            channels = None if self.imagenet else CIFAR_CLASSIFIER_CHANNELS
            logits = ExitClassifier(self.num_classes, channels, ctx, name=f"exit{i}")(to_exit)
            if self.isc and i > 1:
                logits = Add(name=f"isc{i}")(logits, lax.stop_gradient(outputs[-1]))
            outputs.append(logits)
            if i == last:
                break
        return outputs if up_to is None or cascade else outputs[-1]

    def _first_layer(self, ctx: SDPointContext, images: jax.Array) -> list[jax.Array]:
        """Scales ``0..S-1`` of the first layer, finest first."""
        width = self.channels * self.gr_factor[0]
        if self.imagenet:
            x = ctx.conv(width, 7, 2, use_bias=True, name="stem_conv")(images)
            x = Relu()(ctx.norm(FIRST_BLOCK, name="stem_bn")(x))
            x = Pool("max", 3, 2, padding=1)(x)
        else:
            x = ConvBasic(width, 3, 1, ctx, name="first_scale0")(images)
        xs = [x]
        for s in range(1, self.num_scales):
            x = ConvBasic(self.channels * self.gr_factor[s], 3, 2, ctx, name=f"first_scale{s}")(x)
            xs.append(x)
        return xs

    def _dense_layer(
        self, ctx: SDPointContext, xs: list[jax.Array], spec: LayerPlan, layer: int
    ) -> list[jax.Array]:
        """Dense layer ``layer`` (1-based): ``xs`` holds the ``spec.in_scales`` coarsest
        scales, finest first; returns the ``spec.out_scales`` coarsest."""
        discard = spec.in_scales - spec.out_scales
        offset = self.num_scales - spec.out_scales
        outputs = []
        for j in range(spec.out_scales):
            s = offset + j
            finer = None if discard == 0 and j == 0 else xs[j - 1 + discard]
            unit = ScaleUnit(
                self.growth * self.gr_factor[s],
                self.bn_factor[s - 1] if s > 0 else 0,
                self.bn_factor[s],
                ctx,
                name=f"layer{layer}_scale{s}",
            )
            outputs.append(unit(xs[j + discard], finer))
        if spec.transition is None:
            return outputs
        return [
            ConvBasic(
                spec.transition * self.gr_factor[offset + j],
                1,
                1,
                ctx,
                name=f"transition{layer}_scale{offset + j}",
            )(x)
            for j, x in enumerate(outputs)
        ]


OPTION_FIELDS = {"step": "step", "base": "base", "ch": "channels", "gr": "growth"}
"""Name options ``-step<S>``, ``-base<B>``, ``-ch<C>``, ``-gr<G>`` -> model fields."""

CIFAR_SETTING = {"step": 1, "base": 1, "stepmode": "lin_grow", "channels": 16, "growth": 6}
"""MSDNet's CIFAR setting of IMTA's Table 1 (the MSDNet authors' budgeted-batch
command, ``--stepmode lin_grow --step 1 --base 1 --nChannels 16 --growthRate 6
--grFactor 1-2-4 --bnFactor 1-2-4``): with 7 blocks its per-exit parameters and
MADDs are the table's 0.30M .. 4.0M and 6.86M .. 137.3M. (The anytime command,
``--stepmode even --step 2 --base 4``, gives 0.43M .. 3.07M and 15.0M .. 75.5M.)"""

IMAGENET_SETTING = {
    "step": 4,
    "base": 4,
    "stepmode": "even",
    "channels": 32,
    "growth": 16,
    "gr_factor": (1, 2, 4, 4),
    "bn_factor": (1, 2, 4, 4),
    "imagenet": True,
}
"""The ImageNet setting of IMTA (``run_IMTA.sh``): 4 scales, ``--step 4 --base 4
--nChannels 32 --growthRate 16 --grFactor 1-2-4-4 --bnFactor 1-2-4-4``."""


def parse_options(options: str) -> dict[str, Any]:
    """Model fields of a name's option suffix, e.g. ``"-even-step2-base4-ch8-gr4"`` ->
    ``{"stepmode": "even", "step": 2, "base": 4, "channels": 8, "growth": 4}``."""
    fields: dict[str, Any] = {}
    for option in filter(None, options.split("-")):
        if option in STEP_MODES:
            fields["stepmode"] = option
            continue
        match = re.fullmatch(r"([a-z]+)(\d+)", option)
        if not match or match[1] not in OPTION_FIELDS:
            raise ValueError(
                f"unknown MSDNet option {option!r}; expected even, lin_grow, step<S>, "
                f"base<B>, ch<C> or gr<G>"
            )
        fields[OPTION_FIELDS[match[1]]] = int(match[2])
    return fields


def msdnet(
    num_exits: int, num_classes: int | None = None, *, imagenet: bool = False, **kwargs: Any
) -> MSDNet:
    """MSDNet with ``num_exits`` blocks in the CIFAR (:data:`CIFAR_SETTING`, 3 scales)
    or ImageNet (:data:`IMAGENET_SETTING`) setting, any field overridable by
    ``kwargs``; validated eagerly (a bad hyper-parameter raises here). ``num_classes``
    defaults to 10 (CIFAR) or 1000 (ImageNet)."""
    if num_classes is None:
        num_classes = 1000 if imagenet else 10
    fields = dict(IMAGENET_SETTING if imagenet else CIFAR_SETTING)
    fields.update(kwargs)
    model = MSDNet(num_blocks=num_exits, num_classes=num_classes, **fields)
    model.plan  # noqa: B018 - validates the hyper-parameters now
    return model
