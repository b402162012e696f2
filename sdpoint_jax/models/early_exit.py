"""Wide ResNet with early exits: the "Early-Exits (EE)" baseline of the SDPoint paper.

Kuen et al. (CVPR 2018), Sect. 6.1.1 (i): the WRN gets intermediate classifiers
("branches", after BranchyNet): every network stage has two evenly spaced branches,
each branch being one building block with the hyper-parameters of that stage's blocks
followed by a classifier. At inference every sample exits at the same branch.

Layout (:class:`EarlyExitWRN`). The trunk is :class:`~sdpoint_jax.models.wrn.WideResNet`'s
(same stem, :class:`~sdpoint_jax.models.wrn.PreActBasicBlock` stages, final
BN-ReLU-pool-linear head, same parameter names). With ``n`` blocks per stage the exits
sit after blocks ``max(1, n // 2)`` and ``n`` of each stage (for ``n = 1`` the two
positions coincide and the stage has one exit): ``k = 6`` exits for ``n >= 2``
(WRN-28-10: after trunk blocks 2, 4, 6, 8, 10, 12). The last exit of the last stage is
the network's own head; every other exit is a branch::

    PreActBasicBlock(stage width, stride 1) -> BN -> ReLU -> global avg pool -> linear

Batch norm works as in the unmodified network: the layers come from an
:class:`~sdpoint_jax.core.points.SDPointContext` running the full instance in an instance
space without downsampling points, every one in the block before every point
(:data:`~sdpoint_jax.core.norm.FIRST_BLOCK`). So every BN layer owns the ``"full"``
statistics (read at inference, updated in training) and the ``"uniform"`` ones, exactly
the keys :class:`WideResNet` reads and updates under the full instance.

Training techniques of Li et al., "Improved Techniques for Training Adaptive Deep
Networks" (ICCV 2019, "IMTA"), as switches of the model:

* ``ge``: Gradient Equilibrium (Sect. 3.1), :func:`ge_split` at every branch point;
* ``isc``: Inline Subnetwork Collaboration (Sect. 3.2) with the identity transfer:
  ``logits_i = own_i + stop_gradient(logits_{i-1})`` for ``i >= 2``, where
  ``logits_{i-1}`` is exit ``i - 1``'s final output (itself including the transfer, so
  every exit learns a residual on top of all earlier ones). The paper: "even the
  simplest identity transform improves the performance ... each classifier (except
  the very first one) can be considered as performing residual learning ... we
  discard the gradients along knowledge transform path in back propagation". (The
  authors' code uses a learnt Linear-BN-ReLU of the previous logits concatenated to the
  classifier's features instead; we follow the paper's identity form.)
* One-for-all distillation (Sect. 3.3) is a loss term, in
  :mod:`sdpoint_jax.compare.early_exit`.

FLOPs: :func:`sdpoint_jax.models.cost.count_exit_flops` counts either what exiting at
one exit needs (static exit, the SDPoint paper's EE curve) or what a budgeted-inference
cascade evaluates before a sample leaves at that exit.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.layers import Add, GlobalAvgPool, Relu, classifier
from sdpoint_jax.core.norm import FIRST_BLOCK
from sdpoint_jax.core.points import SDPointContext
from sdpoint_jax.models.wrn import PreActBasicBlock, WideResNet


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def ge_split(x: jax.Array, exit: int, num_exits: int) -> tuple[jax.Array, jax.Array]:
    """Gradient Equilibrium at the branch point of exit ``exit`` (IMTA Sect. 3.1, Eq. 4-5).

    The trunk feature ``x`` feeding exit ``i = exit`` of ``k = num_exits`` splits into
    the branch (exit ``i``) and the continuing trunk (exits ``i+1..k``). Forward: the
    identity, ``(x, x)``. Backward: the branch's gradient is scaled by ``1 / (k - i + 1)``
    and the trunk's by ``(k - i) / (k - i + 1)``, the paper's two re-scaling modules
    ("for the gradients contributed by the current i-th classifier and the subsequent
    (k - i) classifiers"). Chained over every branch point, the gradient of exit ``j``'s
    loss w.r.t. the features of stage ``i <= j`` is ``1 / (k - i + 1)`` times the plain
    one (Eq. 5), so the summed gradient of the ``k - i + 1`` losses reaching stage ``i``
    is their average. (The authors' code applies the same two factors as
    ``R(x, 1/(k-i+1))`` before the branch and ``R(., k - i)`` on the trunk after it.)

    Args:
      x: the trunk feature, any shape and dtype.
      exit: ``i``, 1-based, ``1 <= i <= k`` (at ``i = k`` the trunk factor is 0).
      num_exits: ``k``.

    Returns:
      ``(to_branch, to_trunk)``, both equal to ``x``.
    """
    check_exit(exit, num_exits)
    return x, x


def _ge_split_fwd(
    x: jax.Array, exit: int, num_exits: int
) -> tuple[tuple[jax.Array, jax.Array], None]:
    check_exit(exit, num_exits)
    return (x, x), None


def _ge_split_bwd(
    exit: int, num_exits: int, _: None, grads: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array]:
    to_branch, to_trunk = grads
    paths = num_exits - exit + 1  # exits i..k reach x
    return (to_branch * (1.0 / paths) + to_trunk * ((paths - 1) / paths),)


ge_split.defvjp(_ge_split_fwd, _ge_split_bwd)


def check_exit(exit: int, num_exits: int) -> None:
    """Raises ``ValueError`` naming ``exit`` unless it is one of ``1..num_exits``."""
    if not 1 <= exit <= num_exits:
        raise ValueError(f"exit {exit} outside 1..{num_exits}")


def full_network_context(module: nn.Module, train: bool) -> SDPointContext:
    """The context of a network with exits: always the full network (no SDPoint
    instance), with ``module``'s batch-norm axis name, momentum and compute dtype."""
    return SDPointContext(
        instance=Instance.full(),
        space=InstanceSpace(0),
        train=train,
        bn_axis_name=module.bn_axis_name,
        bn_momentum=module.bn_momentum,
        dtype=module.dtype,
    )


def _classify(ctx: SDPointContext, x: jax.Array, num_classes: int, norm_name: str) -> jax.Array:
    """BN-ReLU, global average pool and linear classifier; float32 ``(B, num_classes)``.
    Called inside a compact method: the layers belong to the caller."""
    x = Relu()(ctx.norm(FIRST_BLOCK, name=norm_name)(x))
    x = GlobalAvgPool()(x)
    return classifier(num_classes, dtype=ctx.dtype)(x).astype(jnp.float32)


class ExitBranch(nn.Module):
    """One intermediate classifier: a stride-1 :class:`PreActBasicBlock` of ``features``
    channels (the stage's width), then BN-ReLU-pool-linear. ``(B, H, W, features)`` ->
    float32 logits ``(B, num_classes)``."""

    features: int
    num_classes: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = PreActBasicBlock(self.features, 1, FIRST_BLOCK, self.ctx, name="block")(x)
        return _classify(self.ctx, x, self.num_classes, "bn")


class EarlyExitWRN(nn.Module, kw_only=True):
    """WRN-``depth``-``width`` (``depth = 6n + 4``) with ``num_exits`` exits.

    Call as ``model.apply(variables, images, train=bool, up_to=None, cascade=False,
    mutable=...)`` with ``images`` ``(B, H, W, 3)``:

    * ``up_to=None``: the list of the float32 logits ``(B, num_classes)`` of exits
      ``1..k`` (training computes every exit);
    * ``up_to=i``: exit ``i``'s logits ``(B, num_classes)``, computing only what exit
      ``i`` needs (the trunk up to its branch point and its branch; with ``isc`` also
      the earlier branches, whose logits it adds);
    * ``up_to=i, cascade=True``: the list of the logits of exits ``1..i``, evaluated in
      order as budgeted inference does (a sample reaches exit ``i`` only after exits
      ``1..i-1`` were checked).

    ``init`` (with ``up_to=None``) creates every exit's variables. Parameters of the
    trunk are named as in :class:`WideResNet` (``stem``, ``block{b}``, ``final_bn``,
    ``classifier``); branch ``i`` is ``branch{i}``.

    Attributes:
      depth, width: the WRN's depth and widen factor.
      num_classes: classifier outputs.
      ge: Gradient Equilibrium (:func:`ge_split` at every branch point).
      isc: Inline Subnetwork Collaboration (identity transfer of the previous exit's
        logits, gradient stopped).
      bn_axis_name, bn_momentum, dtype: as in
        :class:`~sdpoint_jax.models.base.SDPointModel`.
    """

    depth: int
    width: int
    num_classes: int = 10
    ge: bool = False
    isc: bool = False
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @property
    def blocks_per_stage(self) -> int:
        """``n``; validates the depth as :class:`WideResNet` does."""
        return WideResNet(depth=self.depth, width=self.width).blocks_per_stage

    @property
    def exit_blocks(self) -> tuple[int, ...]:
        """The trunk block (``1..3n``) after which each exit branches off, in order; the
        last is ``3n``, the network's own head."""
        n = self.blocks_per_stage
        positions = sorted({max(1, n // 2), n})
        return tuple(stage * n + p for stage in range(3) for p in positions)

    @property
    def num_exits(self) -> int:
        """``k``: 6 for ``n >= 2`` (two per stage), 3 for WRN-10."""
        return len(self.exit_blocks)

    @nn.nowrap
    def exit_scopes(self, exit: int) -> tuple[str, ...]:
        """The top-level modules that end exit ``exit``: its branch (the last exit: the
        network's head) and ISC."""
        head = ("final_bn", "classifier") if exit == self.num_exits else (f"branch{exit}",)
        return (*head, f"isc{exit}")

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
        exit_at = {block: i for i, block in enumerate(self.exit_blocks, start=1)}
        outputs: list[jax.Array] = []
        x = ctx.conv(16, 3, name="stem")(images.astype(self.dtype))
        for block, (features, stride) in enumerate(self._trunk_blocks(), start=1):
            x = PreActBasicBlock(features, stride, FIRST_BLOCK, ctx, name=f"block{block}")(x)
            i = exit_at.get(block)
            if i is None:
                continue
            if i == k:
                logits = _classify(ctx, x, self.num_classes, "final_bn")
            else:
                to_branch = x
                if self.ge:
                    to_branch, x = ge_split(x, i, k)
                if not (every or i == last):
                    continue
                logits = ExitBranch(features, self.num_classes, ctx, name=f"branch{i}")(to_branch)
            if self.isc and i > 1:
                logits = Add(name=f"isc{i}")(logits, lax.stop_gradient(outputs[-1]))
            outputs.append(logits)
            if i == last:
                break
        return outputs if up_to is None or cascade else outputs[-1]

    def _trunk_blocks(self) -> list[tuple[int, int]]:
        """``(features, stride)`` of trunk blocks ``1..3n``, as in :class:`WideResNet`."""
        n = self.blocks_per_stage
        return [
            (base * self.width, 2 if stage > 0 and position == 0 else 1)
            for stage, base in enumerate((16, 32, 64))
            for position in range(n)
        ]


def early_exit_wrn(depth: int, width: int, num_classes: int = 10, **kwargs: Any) -> EarlyExitWRN:
    """``EarlyExitWRN(depth=depth, width=width, num_classes=num_classes, **kwargs)``,
    validated eagerly (an impossible depth raises here)."""
    model = EarlyExitWRN(depth=depth, width=width, num_classes=num_classes, **kwargs)
    model.num_exits  # noqa: B018 - validates the depth now
    return model
