"""SDPoint (and the plain network, and UBN) as comparison methods.

One trained SDPoint network gives two curves: per-instance batch-norm statistics
(``"sdpoint"``) and the uniform statistics kept alongside them (``"sdpoint-ubn"``, the
paper's UBN baseline: training is identical, since batch statistics do not depend on
which running averages are updated). ``sdpoint=False`` trains the unmodified network
(``"baseline"``: the full instance only). A low-mode schedule (paper 003,
:mod:`sdpoint_jax.core.lowmode`) adds low-mode steps to either (``"sdpoint+low"``,
``"low"``), drawn exactly as ``python -m sdpoint_jax.main train`` and
``python -m sdpoint_jax.time_to_accuracy`` draw them; evaluation is in full mode.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from sdpoint_jax.compare.method import Method, Variables
from sdpoint_jax.core.instance import DEFAULT_RATIOS, Instance
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training.schedules import LowModeSchedule
from sdpoint_jax.training.trainee import SDPointTrainee

# A setting: the instance and the batch-norm statistics it is evaluated with.
SDPointSetting = tuple[Instance, str]


class SDPointMethod(Method):
    """SDPoint training of registry model ``model_name`` (``sdpoint=False``: baseline).

    It trains exactly as ``python -m sdpoint_jax.main train`` does
    (:class:`~sdpoint_jax.training.trainee.SDPointTrainee`, with the ``low_mode``
    schedule if given): training settings are the drawn instances (and low modes);
    eval settings are every instance with each of ``bn_modes``.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        *,
        sdpoint: bool = True,
        bn_modes: Sequence[str] = ("instance", "uniform"),
        ratios: tuple[float, ...] = DEFAULT_RATIOS,
        low_mode: LowModeSchedule | None = None,
        name: str | None = None,
    ) -> None:
        self.model = create(model_name, num_classes=num_classes, ratios=ratios)
        self.sdpoint = sdpoint
        self.bn_modes = tuple(bn_modes) if sdpoint else ("instance",)
        default = "sdpoint" if sdpoint else "baseline"
        if low_mode is not None:
            default = "sdpoint+low" if sdpoint else "low"
        self.name = name or default
        self._by_mode = {mode: self.model.clone(bn_mode=mode) for mode in self.bn_modes}
        self._training = SDPointTrainee(self.model, sdpoint, low_mode, name=self.name)

    def init_variables(self, key: jax.Array, image_size: int) -> Variables:
        return self._training.init_variables(key, image_size)

    def train_setting(self, seed: int, step: int) -> Instance:
        return self._training.train_setting(seed, step)

    def loss(
        self,
        params: Any,
        variables: Variables,
        batch: dict[str, jax.Array],
        setting: Instance,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[Variables, jax.Array]]:
        return self._training.loss(params, variables, batch, setting, key)

    def trained_statistics(self, batch_stats: Mapping[str, Any], setting: Instance) -> dict:
        return self._training.trained_statistics(batch_stats, setting)

    def program_keys(self) -> list[Instance]:
        return self._training.program_keys()

    def draw_names(self) -> list[str]:
        return self._training.draw_names()

    def eval_settings(self) -> list[SDPointSetting]:
        instances = list(self.model.space) if self.sdpoint else [Instance.full()]
        return [(instance, mode) for mode in self.bn_modes for instance in instances]

    def full_setting(self, image_size: int) -> SDPointSetting:
        """The full instance with its own statistics. (Not the most expensive setting:
        an instance pooling after the last block adds the pooling's FLOPs to the full
        network's.)"""
        return Instance.full(), self.bn_modes[0]

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
