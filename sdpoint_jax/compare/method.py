"""What the comparison harness needs from a way of getting cost-adjustable inference.

A :class:`Method` (SDPoint, early exits, multiscale training, a regularised baseline,
...) is trained by the project's one training loop (:func:`sdpoint_jax.training.loop.fit`)
and evaluated by :mod:`sdpoint_jax.compare.trainer`, on identical data, schedule and
seed. Its cost settings ("settings": an SDPoint
instance, an exit index, an input size) are hashable and static: each setting is its
own XLA program, like an SDPoint instance.

Variables are ``{"params": ..., <other collections>}``; only ``"params"`` is trained by
the optimizer, the other collections (batch-norm statistics) are returned by
:meth:`Method.loss`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import jax
import numpy as np

from sdpoint_jax.training.trainee import Setting, Trainee, Variables


class Method(Trainee):
    """One method of the comparison: a :class:`~sdpoint_jax.training.trainee.Trainee`
    (trained by the project's training loop) that can also be evaluated at each of its
    cost settings.

    Attributes:
      name: short name used in ``compare.csv`` and the plot legend (e.g. ``"sdpoint"``).
      architecture: config fields (dotted paths) that fix the network, where a method
        declares them (a phase II checks them against its phase I's checkpoint; the
        comparison plot's title names the networks they give); none by default.
    """

    architecture: tuple[str, ...] = ()

    @abc.abstractmethod
    def eval_settings(self) -> Sequence[Setting]:
        """Every setting evaluated at inference, cheapest or most expensive first."""

    @abc.abstractmethod
    def logits(self, variables: Variables, images: jax.Array, setting: Setting) -> jax.Array:
        """Deterministic inference logits ``(B, classes)`` of ``images``
        ``(B, S, S, 3)`` at ``setting`` (traced under ``jit``, ``setting`` static)."""

    @abc.abstractmethod
    def gflops(self, setting: Setting, image_size: int) -> float:
        """GFLOPs of one image at ``setting`` (the project's FLOPs counter)."""

    def full_setting(self, image_size: int) -> Setting:
        """The most expensive eval setting (the first of equals): the full network,
        whose test error the learning-curve monitor logs."""
        settings = list(self.eval_settings())
        return max(settings, key=lambda setting: self.gflops(setting, image_size))

    def describe(self, setting: Setting) -> str:
        """Human-readable setting for tables and ``compare.csv``."""
        return str(setting)

    def stochastic_probabilities(
        self, variables: Variables, images: jax.Array, key: jax.Array, passes: int
    ) -> jax.Array:
        """Stochastic inference (paper Table 2): mean softmax probabilities ``(B,
        classes)`` over ``passes`` random forward passes, a deterministic function of
        ``key``. Methods without it keep this default; see
        :meth:`has_stochastic_inference`."""
        raise NotImplementedError(f"{self.name} has no stochastic inference")

    def exit_probabilities(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Budgeted (confidence-threshold) inference over a cascade of exits: softmax
        probabilities ``(k, B, classes)`` of the ``k`` exits in cascade order. Methods
        without exits keep this default; see :meth:`has_exits`."""
        raise NotImplementedError(f"{self.name} has no exits")

    def exit_gflops(self, image_size: int) -> np.ndarray:
        """``(k,)`` GFLOPs of an image leaving the cascade at each exit."""
        raise NotImplementedError(f"{self.name} has no exits")

    def has_stochastic_inference(self) -> bool:
        """Whether :meth:`stochastic_probabilities` is implemented (and meaningful)."""
        return type(self).stochastic_probabilities is not Method.stochastic_probabilities

    def has_exits(self) -> bool:
        """Whether budgeted inference over exits is implemented."""
        return type(self).exit_probabilities is not Method.exit_probabilities

    def curve(self, setting: Setting) -> str:
        """The plotted line ``setting`` belongs to (default: the method's name; one
        trained method may give several, e.g. SDPoint with instance BN and with UBN)."""
        return self.name
