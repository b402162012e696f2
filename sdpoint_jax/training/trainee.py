"""What the training loop trains: a :class:`Trainee` says, per step, which static
setting runs and what its loss is.

One loop (:mod:`sdpoint_jax.training.loop`) trains every network of the project: SDPoint
(:class:`SDPointTrainee`, with low mode), and each method of the comparison harness
(:class:`sdpoint_jax.compare.method.Method` adds evaluation to this interface). A setting
(an SDPoint instance, a low mode, an exit index, an input size, ...) is hashable and
static: each compiles into its own gradient program.

Variables are ``{"params": ..., "batch_stats": ...}``; the optimizer trains
``"params"``, and :meth:`Trainee.loss` returns the updated running statistics.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.lowmode import LowMode
from sdpoint_jax.core.norm import trained_statistics
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.training.schedules import LowModeSchedule, ProgramKey, draw_step

Setting = Hashable
Variables = dict[str, Any]


class Trainee(abc.ABC):
    """A network and its training rule, as the training loop needs them.

    Attributes:
      name: short name (logs, ``compare.csv``, the plot legend).
    """

    name: str

    @abc.abstractmethod
    def init_variables(self, key: jax.Array, image_size: int) -> Variables:
        """Fresh ``{"params", "batch_stats"}`` for square images of side ``image_size``."""

    @abc.abstractmethod
    def train_setting(self, seed: int, step: int) -> Setting:
        """The static setting of training step ``step``: a pure function of
        ``(seed, step)``, so a resumed run draws what an uninterrupted one draws."""

    @abc.abstractmethod
    def loss(
        self,
        params: Any,
        variables: Variables,
        batch: dict[str, jax.Array],
        setting: Setting,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[Variables, jax.Array]]:
        """Training loss of ``batch`` (``image (B, S, S, 3)``, ``label (B,)``) at
        ``setting``; traced under ``jit`` with ``setting`` static.

        Args:
          params: the parameters being differentiated.
          variables: ``{"batch_stats": ...}``: the running statistics the step reads
            (:meth:`trained_statistics` of the setting), and possibly a stale
            ``"params"`` entry (use ``params``).
          key: randomness of this step (dropout, stochastic depth, ...), derived from
            the run's seed and the step.

        Returns:
          ``(loss, (updated collections, logits (B, classes)))``: the collections hold
          the updated ``"batch_stats"`` (none, or an empty dict, for a step that updates
          no statistics); the logits give the logged training accuracy.
        """

    def trained_statistics(self, batch_stats: Mapping[str, Any], setting: Setting) -> Any:
        """The part of ``batch_stats`` a step of ``setting`` reads and updates (its
        gradient program takes only that part): all of them unless a trainee says
        otherwise."""
        return batch_stats

    def trainable(self, params: Any) -> Any | None:
        """Which parameters the optimizer updates: a tree of bools shaped like
        ``params`` (the others stay bit-identical: no update, no weight decay), or None
        for all of them."""
        return None

    def program_keys(self) -> Sequence[Setting]:
        """Every setting a training step can draw, compiled up front with
        ``precompile`` (empty: compiled when first drawn)."""
        return ()

    def draw_names(self) -> list[str]:
        """The settings whose draws a checkpoint counts (``str`` of each), at zero."""
        return [str(setting) for setting in self.program_keys()]


def fresh_variables(
    model: nn.Module, key: jax.Array, image_size: int, **call_kwargs: Any
) -> Variables:
    """``model.init(key, images, train=False, **call_kwargs)`` for a batch of one square
    RGB image of side ``image_size``, without running the network: Flax's ``lazy_init``
    traces the forward pass abstractly and runs only the initialisers, each as ``init``
    runs it, so the variables are bit-identical to ``init``'s (and come about 10% sooner
    for a WRN-10-1, 10-20% for deeper networks: no eager forward pass)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return dict(model.lazy_init(key, images, train=False, **call_kwargs))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits (B, classes)`` against int ``labels (B,)``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass(frozen=True)
class SDPointTrainee(Trainee):
    """SDPoint training (Algorithm 1 of the paper) of ``model``.

    Every step draws one instance ``(p, r)`` from a generator seeded by ``(seed, step)``
    (:func:`sdpoint_jax.training.schedules.draw_step`); ``sdpoint=False`` trains the
    plain network (every step is the full instance). With a ``low_mode`` schedule (paper
    003), a step first draws whether it runs the full instance in low mode; low-mode
    steps update no running statistics. A step of an instance passes its gradient
    program only the statistics that instance reads and updates
    (:func:`sdpoint_jax.core.norm.trained_statistics`).
    """

    model: SDPointModel
    sdpoint: bool = True
    low_mode: LowModeSchedule | None = None
    name: str = "sdpoint"

    def __post_init__(self) -> None:
        if self.low_mode is not None:
            self.model.check_low_mode(self.low_mode.mode)

    def init_variables(self, key: jax.Array, image_size: int) -> Variables:
        return fresh_variables(self.model, key, image_size, instance=Instance.full())

    def train_setting(self, seed: int, step: int) -> ProgramKey:
        return draw_step(self.model.space, seed, step, self.sdpoint, self.low_mode)

    def loss(
        self,
        params: Any,
        variables: Variables,
        batch: dict[str, jax.Array],
        setting: ProgramKey,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[Variables, jax.Array]]:
        """Cross-entropy of ``setting``: an instance in full mode, or the full instance
        in a :class:`~sdpoint_jax.core.lowmode.LowMode` (the model downsamples the
        images)."""
        instance, low_mode = instance_and_low_mode(setting)
        self.model.check_low_mode(low_mode)
        mode = {} if low_mode is None else {"low_mode": low_mode}
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["image"],
            instance=instance,
            train=True,
            mutable=["batch_stats"],
            **mode,
        )
        return cross_entropy(logits, batch["label"]), (dict(updates), logits)

    def trained_statistics(self, batch_stats: Mapping[str, Any], setting: ProgramKey) -> dict:
        instance, low_mode = instance_and_low_mode(setting)
        trained = None if low_mode is not None else instance
        return trained_statistics(batch_stats, trained, self.model.space, self.model.bn_mode)

    def program_keys(self) -> list[ProgramKey]:
        """Every program a training step can draw (full instance first)."""
        keys: list[ProgramKey] = list(self.model.space if self.sdpoint else [Instance.full()])
        if self.low_mode is not None:
            keys.append(self.low_mode.mode)
        return keys

    def draw_names(self) -> list[str]:
        """Every instance of the space, and the low mode if on (also when SDPoint is
        off, so every run's checkpoint has the same counts)."""
        names = [str(instance) for instance in self.model.space]
        return names + ([str(self.low_mode.mode)] if self.low_mode is not None else [])


def instance_and_low_mode(key: ProgramKey) -> tuple[Instance, LowMode | None]:
    """What a step of ``key`` runs: an instance in full mode, or the full instance in a
    low mode."""
    return (Instance.full(), key) if isinstance(key, LowMode) else (key, None)


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The random key of training step ``step`` of a run seeded by ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), step)
