"""IMTA's two-phase training (Li et al., ICCV 2019, Sect. 4 "Training Details").

* Phase I trains a network with exits from scratch on the summed exit losses, with
  Gradient Equilibrium (an :class:`~sdpoint_jax.compare.early_exit.ExitMethod` whose
  model has ``ge``), on the config's ``optim`` schedule, in its own run directory.
* Phase II (:class:`FineTuneMethod`) starts from phase I's latest checkpoint and
  fine-tunes **only the last layer of each classifier** (the linear layer of every
  exit) with Inline Subnetwork Collaboration and One-for-all distillation, on the
  config's ``finetune`` schedule (:func:`phase_two_config`), in its own run directory.

Both phases run through the project's one training loop
(:func:`sdpoint_jax.training.loop.fit`) and resume. The frozen layers stay
bit-identical: the optimizer gives them no update (not even weight decay,
:meth:`FineTuneMethod.trainable`), and the network runs with its running batch-norm
statistics, which phase II leaves as phase I made them. (The authors' ``main_IMTA.py``
freezes the body's parameters but leaves the model in training mode, so its BN layers
normalise with batch statistics and their running averages drift during fine-tuning;
and its classifiers' new linear layers start from scratch on the features
concatenated with a learnt transform of the previous exit's logits. Here ISC is the
paper's identity transfer, so the last layers keep phase I's shapes and start from
phase I's weights.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from sdpoint_jax.compare.early_exit import ExitMethod
from sdpoint_jax.config import get_field
from sdpoint_jax.training.checkpoint import CheckpointError

PHASE_TWO_SCHEDULE = ("num_epochs", "learning_rate", "lr_drop_epochs", "lr_decay")
"""The ``optim`` fields a phase II takes from the config's ``finetune`` group."""


def phase_two_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``optim``'s schedule (:data:`PHASE_TWO_SCHEDULE`) replaced by
    ``finetune``'s: the config phase II trains (and checkpoints) with."""
    phase_two = ml_collections.ConfigDict(config.to_dict())
    for field in PHASE_TWO_SCHEDULE:
        phase_two.optim[field] = config.finetune[field]
    return phase_two


def is_last_layer(path: tuple[str, ...], num_exits: int) -> bool:
    """Whether the parameter at ``path`` belongs to an exit's last (linear) layer:
    ``exit{i}/linear`` of an MSDNet, ``branch{i}/classifier`` and the head's
    ``classifier`` of an early-exit WRN."""
    exits = {f"exit{i}" for i in range(1, num_exits + 1)} | {
        f"branch{i}" for i in range(1, num_exits)
    }
    layer = path[-2] if len(path) >= 2 else ""
    owner = path[-3] if len(path) >= 3 else None
    return (layer == "linear" and owner in exits) or (
        layer == "classifier" and (owner is None or owner in exits)
    )


class FineTuneMethod(ExitMethod):
    """Phase II of IMTA on the network of ``phase_one``: only each exit's last layer
    is trained, with ``isc`` and ``ofa``; evaluation as :class:`ExitMethod`.

    Its training starts from ``phase_one``'s variables, given by :meth:`start_from`
    before training (:func:`sdpoint_jax.compare.trainer.train_method` reads them from
    phase I's run directory).

    Args:
      phase_one: the phase-I method (its model's ``ge`` is phase I's).
      isc, ofa: the phase-II techniques.
      temperature, alpha: OFA's (:mod:`sdpoint_jax.compare.early_exit`).
      name: the method's name.
    """

    def __init__(
        self,
        phase_one: ExitMethod,
        *,
        isc: bool,
        ofa: bool,
        temperature: float,
        alpha: float,
        name: str,
    ) -> None:
        super().__init__(
            phase_one.model.clone(isc=isc, ge=False),
            ofa=ofa,
            temperature=temperature,
            alpha=alpha,
            name=name,
        )
        self.phase_one = phase_one
        self.architecture = phase_one.architecture
        self._start: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, phase_one={self.phase_one.name!r})"

    def start_from(self, variables: dict[str, Any]) -> None:
        """Phase I's trained variables: phase II's starting point."""
        self._start = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def init_variables(self, key: jax.Array, image_size: int) -> dict[str, Any]:
        """Phase I's variables (:meth:`start_from`); ``key`` is not used."""
        if self._start is None:
            raise RuntimeError(f"{self.name}: phase II starts from phase I's variables")
        return dict(self._start)

    def trainable(self, params: Any) -> Any:
        """Only the exits' last layers (:func:`is_last_layer`)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, _: is_last_layer(_keys(path), self.num_exits), params
        )

    def loss(
        self,
        params: Any,
        variables: dict[str, Any],
        batch: dict[str, jax.Array],
        setting: None,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[dict[str, Any], jax.Array]]:
        """:meth:`exit_loss` of every exit with the frozen layers' gradients stopped
        and batch norm on its running statistics, returned as they are: copied, since
        the gradient program takes over (donates) the statistics it reads, and an
        input handed straight back would be forwarded as the donated array itself."""
        mask = self.trainable(params)
        params = jax.tree.map(lambda p, on: p if on else lax.stop_gradient(p), params, mask)
        logits = self.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["image"],
            train=False,
        )
        loss = self.exit_loss(logits, batch["label"])
        unchanged = jax.tree.map(jnp.copy, variables["batch_stats"])
        return loss, ({"batch_stats": unchanged}, logits[-1])


def check_architecture(
    method: ExitMethod, saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> None:
    """``CheckpointError`` naming every field of ``method.architecture`` on which the
    phase-I checkpoint's config ``saved`` differs from ``config``."""
    changed = [
        f"{path}: {get_field(saved, path)!r} (phase I) vs {get_field(config, path)!r}"
        for path in method.architecture
        if get_field(saved, path) != get_field(config, path)
    ]
    if changed:
        raise CheckpointError(
            f"the phase-I checkpoint of {method.name} is of another architecture "
            f"({', '.join(changed)}); use a new --workdir or the phase-I config"
        )


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "key", entry)) for entry in path)
