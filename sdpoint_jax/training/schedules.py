"""What each training step runs, as pure functions of ``(seed, step)``: the learning
rate, the SDPoint instance (Algorithm 1 of the paper) and, with low mode on, whether
the step runs in low mode (:class:`LowModeSchedule`, paper 003 Sect. 3.1, Algorithm 1,
Sect. 4). A resumed run therefore draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np
import optax

from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.lowmode import LowMode, check_probability

ProgramKey = Instance | LowMode
"""What selects a train-step program: an SDPoint instance (in full mode), or a
:class:`LowMode` (the full instance in low mode)."""


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Constant ``learning_rate``, multiplied by ``lr_decay`` at each drop epoch."""
    drops = {
        round(epoch * steps_per_epoch): config.optim.lr_decay
        for epoch in config.optim.lr_drop_epochs
    }
    return optax.piecewise_constant_schedule(config.optim.learning_rate, drops)


def draw_instance(space: InstanceSpace, seed: int, step: int, sdpoint: bool) -> Instance:
    """The instance of training step ``step``: a pure function of ``(seed, step)``."""
    if not sdpoint:
        return Instance.full()
    return space.sample(np.random.default_rng([seed, step]))


def draw_step(
    space: InstanceSpace,
    seed: int,
    step: int,
    sdpoint: bool,
    low_mode: LowModeSchedule | None,
) -> ProgramKey:
    """The program of training step ``step``, a pure function of ``(seed, step)``: the
    low-mode setting if ``low_mode`` draws low mode for the step, else
    :func:`draw_instance`."""
    if low_mode is not None and low_mode.is_low(seed, step):
        return low_mode.mode
    return draw_instance(space, seed, step, sdpoint)


def low_mode_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> LowModeSchedule | None:
    """The run's low-mode schedule, or None when low mode is off (every probability 0).

    ``config.low_mode.epoch_probs`` (one per epoch), when set, replaces the constant
    ``config.low_mode.prob``; setting both is an error.
    """
    per_epoch = config.low_mode.epoch_probs
    check_probability("low_mode.prob", config.low_mode.prob)
    if per_epoch is not None and config.low_mode.prob != 0.0:
        raise ValueError(
            f"set either low_mode.prob ({config.low_mode.prob}) or low_mode.epoch_probs, not both"
        )
    schedule = LowModeSchedule.create(
        LowMode(config.low_mode.ratio, config.low_mode.resize),
        config.low_mode.prob if per_epoch is None else tuple(per_epoch),
        num_epochs=config.optim.num_epochs,
        steps_per_epoch=steps_per_epoch,
        lr_drop_epochs=config.optim.lr_drop_epochs,
        full_epochs_after_drop=config.low_mode.full_epochs_after_drop,
    )
    return schedule if any(schedule.epoch_probabilities) else None


_LOW_MODE_TAG = 0x4C4F57  # "LOW": keeps the low-mode draw independent of other draws


@dataclasses.dataclass(frozen=True)
class LowModeSchedule:
    """Which training steps run in low mode.

    Step ``s`` lies in epoch ``e = s // steps_per_epoch``; it runs in low mode with
    probability ``P[e]`` (``epoch_probabilities[e]``), except inside a forced-full
    window (the first epochs after a learning-rate drop), where the probability is 0.
    The draw is a Bernoulli trial from a generator seeded by ``(seed, step)`` alone
    (and a fixed tag that keeps it independent of the SDPoint instance draw), so a
    resumed run draws exactly what an uninterrupted run draws.

    Attributes:
      mode: the low-mode setting of low-mode steps.
      epoch_probabilities: ``P``, one probability in ``[0, 1]`` per epoch.
      steps_per_epoch: training steps per epoch.
      full_windows: ``(start, stop)`` step ranges (stop exclusive) forced to full mode.
    """

    mode: LowMode
    epoch_probabilities: tuple[float, ...]
    steps_per_epoch: int
    full_windows: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.mode, LowMode):
            raise ValueError(f"mode must be a LowMode, got {self.mode!r}")
        if not self.epoch_probabilities:
            raise ValueError("epoch_probabilities must not be empty")
        probabilities = tuple(
            check_probability(f"low-mode probability of epoch {epoch}", p)
            for epoch, p in enumerate(self.epoch_probabilities)
        )
        object.__setattr__(self, "epoch_probabilities", probabilities)
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")

    @classmethod
    def create(
        cls,
        mode: LowMode,
        probability: float | Sequence[float],
        *,
        num_epochs: int,
        steps_per_epoch: int,
        lr_drop_epochs: Sequence[float] = (),
        full_epochs_after_drop: float = 0.0,
    ) -> LowModeSchedule:
        """The schedule of a run of ``num_epochs`` epochs.

        Args:
          mode: the low-mode setting.
          probability: a constant ``p`` for every epoch, or ``P`` (one per epoch, length
            ``num_epochs``).
          num_epochs: epochs of the run.
          steps_per_epoch: training steps per epoch.
          lr_drop_epochs: epochs of the learning-rate drops; a drop at epoch ``d`` is at
            step ``round(d * steps_per_epoch)``, as in the learning-rate schedule.
          full_epochs_after_drop: ``E_full >= 0``: steps ``[drop, drop + round(E_full *
            steps_per_epoch))`` after each drop run in full mode (the paper: 4).
        """
        if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1:
            raise ValueError(f"num_epochs must be an integer >= 1, got {num_epochs!r}")
        if isinstance(probability, Sequence):
            if len(probability) != num_epochs:
                raise ValueError(
                    f"per-epoch low-mode probabilities: got {len(probability)}, expected one "
                    f"per epoch ({num_epochs})"
                )
            probabilities = tuple(probability)
        else:
            probabilities = (check_probability("low-mode probability", probability),) * num_epochs
        if not (isinstance(full_epochs_after_drop, int | float) and full_epochs_after_drop >= 0):
            raise ValueError(
                f"full-mode epochs after a drop must be a number >= 0, got "
                f"{full_epochs_after_drop!r}"
            )
        length = round(full_epochs_after_drop * steps_per_epoch)
        drops = sorted({round(epoch * steps_per_epoch) for epoch in lr_drop_epochs})
        windows = tuple((drop, drop + length) for drop in drops if length > 0)
        return cls(mode, probabilities, steps_per_epoch, windows)

    def probability(self, step: int) -> float:
        """Probability that step ``step`` runs in low mode."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch = step // self.steps_per_epoch
        if epoch >= len(self.epoch_probabilities):
            raise ValueError(
                f"step {step} lies in epoch {epoch}; the schedule has "
                f"{len(self.epoch_probabilities)} epochs"
            )
        if any(start <= step < stop for start, stop in self.full_windows):
            return 0.0
        return self.epoch_probabilities[epoch]

    def is_low(self, seed: int, step: int) -> bool:
        """Whether step ``step`` runs in low mode: a pure function of ``(seed, step)``."""
        probability = self.probability(step)
        if probability in (0.0, 1.0):
            return probability == 1.0
        rng = np.random.default_rng([seed, step, _LOW_MODE_TAG])
        return bool(rng.random() < probability)
