"""SDPoint (and the plain network, and UBN) as comparison methods.

One trained SDPoint network gives two curves: per-instance batch-norm statistics
(``"sdpoint"``) and the uniform statistics kept alongside them (``"sdpoint-ubn"``, the
paper's UBN baseline: training is identical, since batch statistics do not depend on
which running averages are updated). ``sdpoint=False`` trains the unmodified network
(``"baseline"``: the full instance only).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdpoint_jax.compare.method import Method, Variables
from sdpoint_jax.core.instance import DEFAULT_RATIOS, Instance
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training.schedules import draw_instance

# A setting: the instance and the batch-norm statistics it is evaluated with.
SDPointSetting = tuple[Instance, str]


class SDPointMethod(Method):
    """SDPoint training of registry model ``model_name`` (``sdpoint=False``: baseline).

    Training settings are instances drawn as :func:`sdpoint_jax.training.loop.draw_instance`
    draws them (bn mode ``"instance"``); eval settings are every instance with each of
    ``bn_modes``.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        *,
        sdpoint: bool = True,
        bn_modes: Sequence[str] = ("instance", "uniform"),
        ratios: tuple[float, ...] = DEFAULT_RATIOS,
        name: str | None = None,
    ) -> None:
        self.model = create(model_name, num_classes=num_classes, ratios=ratios)
        self.sdpoint = sdpoint
        self.bn_modes = tuple(bn_modes) if sdpoint else ("instance",)
        self.name = name or ("sdpoint" if sdpoint else "baseline")
        self._by_mode = {mode: self.model.clone(bn_mode=mode) for mode in self.bn_modes}

    def init_variables(self, key: jax.Array, image_size: int) -> Variables:
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        return dict(self.model.init(key, images, instance=Instance.full(), train=False))

    def train_setting(self, seed: int, step: int) -> SDPointSetting:
        return draw_instance(self.model.space, seed, step, self.sdpoint), "instance"

    def loss(
        self,
        params: Any,
        variables: Variables,
        batch: dict[str, jax.Array],
        setting: SDPointSetting,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[Variables, jax.Array]]:
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["image"],
            instance=setting[0],
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (dict(updates), logits)

    def eval_settings(self) -> list[SDPointSetting]:
        instances = list(self.model.space) if self.sdpoint else [Instance.full()]
        return [(instance, mode) for mode in self.bn_modes for instance in instances]

    def logits(self, variables: Variables, images: jax.Array, setting: SDPointSetting) -> jax.Array:
        instance, mode = setting
        return self._by_mode[mode].apply(variables, images, instance=instance, train=False)

    def stochastic_probabilities(
        self, variables: Variables, images: jax.Array, key: jax.Array, passes: int
    ) -> jax.Array:
        """SDPoint's stochastic inference (paper Table 2): mean softmax probabilities
        over ``passes`` instances drawn uniformly as in training (seeded by ``key``),
        each with its own BN statistics. Repeated instances are evaluated once and
        weighted by their count."""
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        draws = Counter(self._draw(rng) for _ in range(passes))
        return self._weighted_probabilities(variables, images, tuple(draws.items()))

    def has_stochastic_inference(self) -> bool:
        return self.sdpoint  # the baseline has one instance: nothing random

    def _draw(self, rng: np.random.Generator) -> Instance:
        """An instance drawn as training draws them (the full network without SDPoint)."""
        return self.model.space.sample(rng) if self.sdpoint else Instance.full()

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def _weighted_probabilities(
        self, variables: Variables, images: jax.Array, draws: tuple[tuple[Instance, int], ...]
    ) -> jax.Array:
        total = sum(
            count * jax.nn.softmax(self.logits(variables, images, (instance, "instance")), -1)
            for instance, count in draws
        )
        return total / sum(count for _, count in draws)

    def gflops(self, setting: SDPointSetting, image_size: int) -> float:
        return count_flops(self.model, setting[0], (image_size, image_size)) / 1e9

    def describe(self, setting: SDPointSetting) -> str:
        return str(setting[0])

    def curve(self, setting: SDPointSetting) -> str:
        return self.name if setting[1] == "instance" else f"{self.name}-ubn"
