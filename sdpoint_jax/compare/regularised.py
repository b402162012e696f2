"""Stochastic-regulariser baselines (the paper's Table 2): a plain WRN trained with
dropout and/or stochastic depth.

The network is a registry Wide ResNet (SDPoint unused: always ``Instance.full()``,
``bn_mode="uniform"`` so each BN layer keeps one statistics key) with the
:class:`~sdpoint_jax.models.wrn.WideResNet` options ``dropout_rate`` and
``stochastic_depth``. It has one inference cost, so one eval setting,
``"deterministic"`` (dropout off, residual branches scaled by their survival
probability). :meth:`RegularisedMethod.stochastic_probabilities` gives *stochastic inference*
(Table 2, after Swapout): the mean softmax over passes that keep the training-time
randomness and use the running batch-norm statistics.

Variables are the model's own: ``{"params": ..., "batch_stats": ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sdpoint_jax.compare.method import Method, Variables
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.models.wrn import WideResNet
from sdpoint_jax.training.trainee import cross_entropy, fresh_variables

_FULL = Instance.full()
DETERMINISTIC = "deterministic"


class RegularisedMethod(Method):
    """A plain WRN with dropout and/or stochastic depth.

    Args:
      model_name: a Wide ResNet registry name (e.g. ``"wrn-16-1"``, ``"wrn-28-10"``).
      num_classes: classifier outputs.
      dropout_rate: dropout probability inside every block, in ``[0, 1)``.
      stochastic_depth: drop rate of the last block (``1 - p_L`` of Huang et al.'s
        linear decay), in ``[0, 1)``.
      name: the method's name in ``compare.csv``; default ``"dropout"``,
        ``"stochastic_depth"`` or ``"dropout+stochastic_depth"`` after the options set.
      **model_kwargs: further model fields (``dtype``, ...);
        ``bn_mode`` is always ``"uniform"``.

    Raises:
      ValueError: a rate outside ``[0, 1)``, both rates 0, or a model that is not a
        Wide ResNet.
    """

    def __init__(
        self,
        model_name: str = "wrn-16-1",
        num_classes: int = 10,
        *,
        dropout_rate: float = 0.0,
        stochastic_depth: float = 0.0,
        name: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        model = create(model_name, num_classes=num_classes, bn_mode="uniform", **model_kwargs)
        if not isinstance(model, WideResNet):
            raise ValueError(
                f"dropout/stochastic depth are options of the Wide ResNet; "
                f"got {model_name!r} ({type(model).__name__})"
            )
        self.model = model.clone(dropout_rate=dropout_rate, stochastic_depth=stochastic_depth)
        if dropout_rate == 0.0 and stochastic_depth == 0.0:
            raise ValueError(
                "RegularisedMethod needs dropout_rate > 0 or stochastic_depth > 0 "
                "(both are 0: that is the plain network)"
            )
        parts = [
            label
            for label, rate in (("dropout", dropout_rate), ("stochastic_depth", stochastic_depth))
            if rate > 0.0
        ]
        self.name = name or "+".join(parts)
        self._stochastic_probs = jax.jit(self._mean_probabilities, static_argnames="passes")

    def init_variables(self, key: jax.Array, image_size: int) -> Variables:
        return fresh_variables(self.model, key, image_size, instance=_FULL)

    def train_setting(self, seed: int, step: int) -> str:
        """Always ``"deterministic"``: the per-step randomness is the ``key`` of
        :meth:`loss`, not a static setting."""
        return DETERMINISTIC

    def program_keys(self) -> list[str]:
        """One program: each step draws its dropout or dropped blocks from its key."""
        return [DETERMINISTIC]

    def loss(
        self,
        params: Any,
        variables: Variables,
        batch: dict[str, jax.Array],
        setting: str,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[Variables, jax.Array]]:
        """Cross-entropy of ``batch`` with dropout / stochastic-depth masks drawn from
        ``key`` (the model's ``"dropout"`` rng stream)."""
        self._check(setting)
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["image"],
            instance=_FULL,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        loss = cross_entropy(logits, batch["label"])
        return loss, ({"batch_stats": updates["batch_stats"]}, logits)

    def eval_settings(self) -> Sequence[str]:
        return (DETERMINISTIC,)

    def logits(self, variables: Variables, images: jax.Array, setting: str) -> jax.Array:
        """Deterministic logits ``(B, classes)``: dropout off, branches scaled by their
        survival probabilities, running BN statistics."""
        self._check(setting)
        return self.model.apply(variables, images, instance=_FULL, train=False)

    def gflops(self, setting: str, image_size: int) -> float:
        """GFLOPs of one ``image_size x image_size`` image. The stochastic-depth scaling
        at inference is not counted (it folds into ``conv2``'s weights)."""
        self._check(setting)
        return count_flops(self.model, _FULL, (image_size, image_size)) / 1e9

    def stochastic_probabilities(
        self, variables: Variables, images: jax.Array, key: jax.Array, passes: int = 50
    ) -> jax.Array:
        """Stochastic inference: mean softmax probabilities ``(B, classes)`` of
        ``images`` ``(B, S, S, 3)`` over ``passes`` forward passes.

        Pass ``i`` draws its dropout / stochastic-depth masks from
        ``jax.random.split(key, passes)[i]`` and normalises with the running BN
        statistics; the result is a deterministic function of ``key``. One compiled
        program per ``(passes, images shape)``, looping over the passes with
        ``lax.scan`` (memory of one pass).
        """
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        return self._stochastic_probs(variables, images, key, passes=passes)

    def _mean_probabilities(
        self, variables: Variables, images: jax.Array, key: jax.Array, *, passes: int
    ) -> jax.Array:
        def one_pass(total: jax.Array, pass_key: jax.Array) -> tuple[jax.Array, None]:
            logits = self.model.apply(
                variables,
                images,
                instance=_FULL,
                train=False,
                stochastic_inference=True,
                rngs={"dropout": pass_key},
            )
            return total + jax.nn.softmax(logits, axis=-1), None

        zeros = jnp.zeros((images.shape[0], self.model.num_classes), jnp.float32)
        total, _ = jax.lax.scan(one_pass, zeros, jax.random.split(key, passes))
        return total / passes

    def _check(self, setting: Any) -> None:
        if setting != DETERMINISTIC:
            raise ValueError(f"{self.name}: the only setting is {DETERMINISTIC!r}, got {setting!r}")
