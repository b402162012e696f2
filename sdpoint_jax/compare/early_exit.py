"""Early exits (EE) as a comparison method, the IMTA training techniques, and budgeted
inference.

:class:`EarlyExitMethod` trains :class:`~sdpoint_jax.models.early_exit.EarlyExitWRN`
jointly: every step computes all ``k`` exits and minimises the sum of their
cross-entropy losses (MSDNet's Eq. 1 with all weights 1, IMTA Sect. 3.1), so
:meth:`~EarlyExitMethod.train_setting` is ``None``. Its settings are the exit indices
``1..k``: every sample exits at the same branch, as in the SDPoint paper's EE baseline
(Sect. 6.1.1 (i)).

The three techniques of Li et al., "Improved Techniques for Training Adaptive Deep
Networks" (ICCV 2019) are switches:

* ``ge`` and ``isc`` (Gradient Equilibrium, Inline Subnetwork Collaboration) live in the
  model, see :mod:`sdpoint_jax.models.early_exit`;
* ``ofa``, One-for-all Knowledge Distillation (Sect. 3.3, Eq. 7-8): the last exit
  teaches every earlier one,
  ``L = CE_k + sum_{i<k} [(1 - alpha) CE_i + alpha T^2 KL(p_k^T || p_i^T)]`` with
  ``p^T = softmax(logits / T)`` and the teacher's logits gradient-stopped (the authors'
  code detaches the soft targets). Eq. 7 writes ``L_i = a CE_i + (1 - a) KLD_i``; our
  ``alpha`` is the distillation weight ``1 - a`` (the code's ``gamma``), and the
  ``T^2`` factor (Hinton et al.) is the authors' code's. The paper states no values;
  the defaults ``T = 1``, ``alpha = 0.1`` are those of the authors' released training
  script (``run_IMTA.sh``; their ``args.py`` defaults are ``T = 3``, ``gamma = 0.9``).
  KL is summed over classes and averaged over the batch (the code's ``KLDivLoss()``
  also averaged over classes, shrinking the term by the number of classes).

Schedules: :class:`EarlyExitMethod` trains every enabled technique jointly from the
first step; IMTA's own schedule (GE first, then ISC and OFA fine-tuning only the
classifiers' last layers) is the two-phase ``ee-imta`` / ``msdnet-imta`` of
:mod:`sdpoint_jax.compare.two_phase`. :class:`ExitMethod` is the same joint training
for any network with exits (the ``msdnet`` methods).

Budgeted inference (MSDNet, Huang et al. ICLR 2018, Sect. 5; IMTA Sect. 4): a sample
leaves at the first exit whose top softmax probability reaches that exit's threshold;
the exits are the stages of :mod:`sdpoint_jax.evaluation.budget`, whose
:func:`~sdpoint_jax.evaluation.budget.fit_thresholds` picks thresholds on held-out training data
for a target average cost and :func:`~sdpoint_jax.evaluation.budget.budgeted_eval` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdpoint_jax.compare.method import Method, Variables
from sdpoint_jax.models.cost import count_exit_flops, exit_costs
from sdpoint_jax.models.early_exit import early_exit_wrn
from sdpoint_jax.training.trainee import cross_entropy, fresh_variables

DEFAULT_TEMPERATURE = 1.0
DEFAULT_ALPHA = 0.1


def ofa_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """``KL(softmax(teacher / T) || softmax(student / T))`` per sample: logits
    ``(B, classes)`` -> ``(B,)``, zero iff the tempered distributions agree. Gradients
    flow into both arguments; the caller stops the teacher's."""
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def joint_loss(
    logits: Sequence[jax.Array],
    labels: jax.Array,
    *,
    ofa: bool = False,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
) -> jax.Array:
    """Joint training loss of exits ``1..k`` (scalar).

    Args:
      logits: the exits' logits, each ``(B, classes)``, last = the teacher.
      labels: integer labels ``(B,)``.
      ofa: without it, ``sum_i CE_i``; with it, the One-for-all loss of the module
        docstring.
      temperature, alpha: ``T`` and the distillation weight.
    """
    ce = [cross_entropy(z, labels) for z in logits]
    if not ofa:
        return sum(ce[1:], ce[0])
    teacher = lax.stop_gradient(logits[-1])
    loss = ce[-1]
    for student, student_ce in zip(logits[:-1], ce[:-1], strict=True):
        kd = ofa_kl(student, teacher, temperature).mean()
        loss = loss + (1.0 - alpha) * student_ce + alpha * temperature**2 * kd
    return loss


class ExitMethod(Method):
    """A network with exits (:class:`~sdpoint_jax.models.early_exit.EarlyExitWRN`,
    :class:`~sdpoint_jax.models.msdnet.MSDNet`) trained jointly on every exit's loss
    (:func:`joint_loss`); settings are exit indices ``1..k``.

    Args:
      model: the network (its ``ge`` and ``isc`` switches are the model's).
      ofa: one-for-all distillation in the loss.
      temperature, alpha: OFA's ``T > 0`` and distillation weight in ``[0, 1]``.
      name: the method's name.
      architecture: config fields (dotted paths) that fix ``model``'s architecture; a
        phase II refuses a phase-I checkpoint written with other values.
    """

    def __init__(
        self,
        model: Any,
        *,
        ofa: bool = False,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        name: str,
        architecture: tuple[str, ...] = (),
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.model = model
        self.ofa = ofa
        self.temperature = temperature
        self.alpha = alpha
        self.name = name
        self.architecture = ("data.dataset", *architecture)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model!r}, ofa={self.ofa}, "
            f"temperature={self.temperature}, alpha={self.alpha}, name={self.name!r})"
        )

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    def init_variables(self, key: jax.Array, image_size: int) -> Variables:
        return fresh_variables(self.model, key, image_size)

    def train_setting(self, seed: int, step: int) -> None:
        return None

    def program_keys(self) -> list[None]:
        """One program: every step trains all exits jointly."""
        return [None]

    def exit_loss(self, logits: list[jax.Array], labels: jax.Array) -> jax.Array:
        """:func:`joint_loss` of the exits' ``logits`` with this method's OFA settings."""
        return joint_loss(
            logits, labels, ofa=self.ofa, temperature=self.temperature, alpha=self.alpha
        )

    def loss(
        self,
        params: Any,
        variables: Variables,
        batch: dict[str, jax.Array],
        setting: None,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[Variables, jax.Array]]:
        """:func:`joint_loss` of every exit; the logged logits are the last exit's."""
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return self.exit_loss(logits, batch["label"]), (dict(updates), logits[-1])

    def eval_settings(self) -> list[int]:
        return list(range(1, self.num_exits + 1))

    def logits(self, variables: Variables, images: jax.Array, setting: int) -> jax.Array:
        """Exit ``setting``'s logits ``(B, classes)``, computing only what it needs."""
        return self.model.apply(variables, images, train=False, up_to=setting)

    def exit_probabilities(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Softmax probabilities of every exit, ``(k, B, classes)``: the input of
        :func:`sdpoint_jax.evaluation.budget.fit_thresholds` and
        :func:`sdpoint_jax.evaluation.budget.budgeted_eval`."""
        logits = self.model.apply(variables, images, train=False)
        return jax.nn.softmax(jnp.stack(logits), axis=-1)

    def gflops(self, setting: int, image_size: int) -> float:
        """GFLOPs of one image exiting at ``setting`` (only what that exit needs)."""
        return count_exit_flops(self.model, setting, (image_size, image_size)) / 1e9

    def exit_gflops(self, image_size: int) -> np.ndarray:
        """GFLOPs ``(k,)`` of one image leaving at each exit in budgeted inference,
        where exits ``1..i-1`` were evaluated before exit ``i``: the ``exit_gflops`` of
        :func:`sdpoint_jax.evaluation.budget.fit_thresholds` and
        :func:`sdpoint_jax.evaluation.budget.budgeted_eval`."""
        costs = exit_costs(self.model, (image_size, image_size))
        return np.array([cost.flops / 1e9 for cost in costs])

    def describe(self, setting: int) -> str:
        return f"exit {setting}"


class EarlyExitMethod(ExitMethod):
    """Early-exit WRN-``depth``-``width``; settings are exit indices ``1..k``.

    Args:
      depth, width, num_classes: the WRN (``depth = 6n + 4``).
      ge, isc, ofa: the IMTA techniques (module docstring).
      temperature, alpha: OFA's ``T > 0`` and distillation weight in ``[0, 1]``.
      name: default ``"ee"`` followed by the enabled techniques, e.g. ``"ee-ge-isc-ofa"``.
    """

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        *,
        ge: bool = False,
        isc: bool = False,
        ofa: bool = False,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        name: str | None = None,
    ) -> None:
        techniques = [t for t, on in (("ge", ge), ("isc", isc), ("ofa", ofa)) if on]
        super().__init__(
            early_exit_wrn(depth, width, num_classes, ge=ge, isc=isc),
            ofa=ofa,
            temperature=temperature,
            alpha=alpha,
            name=name or "-".join(["ee", *techniques]),
            architecture=("model.name",),
        )
