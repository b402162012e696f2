"""Wide ResNet WRN-d-w for CIFAR (Zagoruyko & Komodakis, 2016), pre-activation.

Stem 3x3 conv (16), three stages of ``n = (d - 4) / 6`` basic blocks with
``16w, 32w, 64w`` channels (stride 2 at the first block of stages 2 and 3), then
BN-ReLU, global average pool and a linear classifier. Every block is one SDPoint
point, right after its residual addition: ``N = 3n`` (12 for WRN-28-10, 18 for
WRN-40-4).

Two optional stochastic regularisers (the comparisons of the paper's Table 2), both
off by default (the network is then exactly the plain WRN: same parameters, same
outputs, no random numbers drawn):

* ``dropout_rate``: dropout between the two convolutions of every block, after the
  second BN-ReLU and before ``conv2``, as in the WRN paper (inverted dropout: kept
  activations are scaled by ``1 / (1 - rate)`` in training, inference is the
  identity).
* ``stochastic_depth``: stochastic depth (Huang et al., 2016) with the linear-decay
  rule: block ``l`` of ``L`` survives with probability ``p_l = 1 - l / L * (1 - p_L)``;
  the option is the drop rate of the last block, ``1 - p_L`` (0.5 is Huang et al.'s
  ``p_L = 0.5``). A dropped block outputs its shortcut. Blocks are dropped per
  example (each image of the batch draws its own mask, as common ``DropPath``
  implementations do; Huang et al. drop per mini-batch); the residual branch is always
  computed, so its batch-norm statistics see every example. At deterministic
  inference the residual branch is scaled by ``p_l``.

Low mode (:mod:`sdpoint_jax.core.lowmode`, ``low_mode=LowMode(r)``): the input is
downsampled by ``r`` and both 3x3 convolutions of every block run with average-pooled
kernels (3x3 -> 1x1 for ``r = 2``), the paper's choice for the basic block; the stem
and the 1x1 shortcuts are unchanged.

Randomness comes from Flax's ``"dropout"`` rng stream (``rngs={"dropout": key}``). It
is drawn when ``train=True`` or, for *stochastic inference* (Table 2, after Swapout),
when ``stochastic_inference=True``: training-mode randomness with running batch-norm
statistics.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import Add, Relu
from sdpoint_jax.core.lowmode import LowMode
from sdpoint_jax.core.points import SDPointContext
from sdpoint_jax.models.base import SDPointModel


def check_rate(name: str, rate: float) -> None:
    """Raises ``ValueError`` unless ``0 <= rate < 1`` (a drop probability)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {rate!r}")


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut; a 1x1 conv on the pre-activated
    input where the shape changes (as in the reference WRN code). Both 3x3 convs are
    low-mode eligible (paper 003, Sect. 4: conv1 and conv2 of the basic block).

    Attributes:
      dropout_rate: dropout probability between the BN-ReLU and ``conv2``.
      survival: stochastic-depth survival probability of the residual branch (1 = off).
      stochastic: draw dropout / stochastic-depth masks (training or stochastic
        inference); otherwise dropout is the identity and the branch is scaled by
        ``survival``.
    """

    features: int
    stride: int
    index: int
    ctx: SDPointContext
    dropout_rate: float = 0.0
    survival: float = 1.0
    stochastic: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        preact = Relu()(self.ctx.norm(self.index, name="bn1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = self.ctx.conv(self.features, 1, self.stride, name="shortcut")(preact)
        y = self.ctx.conv(self.features, 3, self.stride, low_mode_eligible=True, name="conv1")(
            preact
        )
        y = Relu()(self.ctx.norm(self.index, name="bn2")(y))
        if self.dropout_rate > 0.0:
            y = nn.Dropout(self.dropout_rate, deterministic=not self.stochastic)(y)
        y = self.ctx.conv(self.features, 3, low_mode_eligible=True, name="conv2")(y)
        if self.survival < 1.0:
            if self.stochastic:
                keep = jax.random.bernoulli(
                    self.make_rng("dropout"), self.survival, (y.shape[0],) + (1,) * (y.ndim - 1)
                )
                y = jnp.where(keep, y, jnp.zeros_like(y))
            else:
                y = y * jnp.asarray(self.survival, y.dtype)
        return Add()(y, shortcut)


class WideResNet(SDPointModel, kw_only=True):
    """WRN-``depth``-``width``; ``depth = 6n + 4``.

    Attributes:
      dropout_rate: dropout probability inside every block, in ``[0, 1)``.
      stochastic_depth: stochastic-depth drop rate of the last block ``1 - p_L``, in
        ``[0, 1)``; block ``l`` is dropped with probability ``l / L * stochastic_depth``.
    """

    depth: int
    width: int
    dropout_rate: float = 0.0
    stochastic_depth: float = 0.0

    supports_low_mode = True

    def __post_init__(self) -> None:
        check_rate("dropout_rate", self.dropout_rate)
        check_rate("stochastic_depth", self.stochastic_depth)
        super().__post_init__()

    @property
    def blocks_per_stage(self) -> int:
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {self.depth}")
        return (self.depth - 4) // 6

    @property
    def num_points(self) -> int:
        return 3 * self.blocks_per_stage

    @property
    def survival_probabilities(self) -> tuple[float, ...]:
        """``p_l = 1 - l / L * stochastic_depth`` for blocks ``l = 1..L`` (all 1.0 when
        stochastic depth is off)."""
        blocks = self.num_points
        return tuple(1.0 - l / blocks * self.stochastic_depth for l in range(1, blocks + 1))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        instance: Instance,
        train: bool,
        stochastic_inference: bool = False,
        low_mode: LowMode | None = None,
    ) -> jax.Array:
        """Logits ``(B, num_classes)`` of images ``x`` ``(B, H, W, 3)``.

        ``stochastic_inference=True`` (with ``train=False``) keeps the training-mode
        dropout / stochastic-depth randomness but normalises with the running
        batch-norm statistics (and does not update them). ``low_mode``: run in low mode.
        """
        if train and stochastic_inference:
            raise ValueError("stochastic_inference=True needs train=False")
        ctx = self.context(instance, train, low_mode)
        survival = self.survival_probabilities
        x = ctx.conv(16, 3, name="stem")(ctx.input(x).astype(self.dtype))
        index = 0
        for stage, base in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
                index += 1
                stride = 2 if stage > 0 and block == 0 else 1
                x = PreActBasicBlock(
                    base * self.width,
                    stride,
                    index,
                    ctx,
                    dropout_rate=self.dropout_rate,
                    survival=survival[index - 1],
                    stochastic=train or stochastic_inference,
                    name=f"block{index}",
                )(x)
                x = ctx.point(x, index)
        x = Relu()(ctx.norm(index + 1, name="final_bn")(x))
        return self.head(x)
