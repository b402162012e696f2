"""What every command that touches a run needs: its config, model, mesh, optimizer,
initial state and checkpoints (:class:`Run`), and the :class:`TrainState` a train step
reads and writes.

Optimisation follows the papers: SGD with Nesterov momentum 0.9 and L2 weight decay
on every parameter (added to the gradient, as PyTorch's ``weight_decay``), and a
step learning-rate schedule (:func:`sdpoint_jax.training.schedules.learning_rate_schedule`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from sdpoint_jax.config import config_from_saved, get_field
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data import pipeline
from sdpoint_jax.models import SDPointModel, create
from sdpoint_jax.training import parallel
from sdpoint_jax.training.checkpoint import CheckpointError, CheckpointManager
from sdpoint_jax.training.schedules import (
    LowModeSchedule,
    ProgramKey,
    learning_rate_schedule,
    low_mode_schedule,
)
from sdpoint_jax.xla_cpu.conv_lowering import resolve_conv_lowering

# Config entries that must not change when a run is resumed.
RESUME_INVARIANTS = (
    "data.dataset",
    "data.train_split",
    "model.name",
    "sdpoint.enabled",
    "sdpoint.ratios",
    "sdpoint.bn_mode",
    "optim.batch_size",
    "optim.num_epochs",
    "optim.learning_rate",
    "optim.lr_drop_epochs",
    "optim.lr_decay",
    "optim.momentum",
    "optim.weight_decay",
    "seed",
    "low_mode.prob",
    "low_mode.epoch_probs",
    "low_mode.ratio",
    "low_mode.resize",
    "low_mode.full_epochs_after_drop",
)


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes (replicated over the mesh)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_model(config: ml_collections.ConfigDict) -> SDPointModel:
    spec = pipeline.dataset_spec(config.data.dataset)
    return create(
        config.model.name,
        num_classes=spec.num_classes,
        ratios=tuple(config.sdpoint.ratios),
        bn_mode=config.sdpoint.bn_mode,
        dtype=jnp.dtype(config.model.dtype),
        conv_lowering=resolve_conv_lowering(config.compile.conv_lowering),
    )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay),
        optax.sgd(
            learning_rate_schedule(config, steps_per_epoch),
            momentum=config.optim.momentum,
            nesterov=True,
        ),
    )


def initial_state(
    model: SDPointModel, tx: optax.GradientTransformation, image_size: int, seed: int
) -> TrainState:
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(jax.random.key(seed), images, instance=Instance.full(), train=False)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


@dataclasses.dataclass
class Run:
    """What every subcommand needs: config, model, mesh, optimizer, checkpoints."""

    config: ml_collections.ConfigDict
    workdir: Path
    model: SDPointModel
    mesh: Mesh
    tx: optax.GradientTransformation
    steps_per_epoch: int
    low_mode: LowModeSchedule | None = None

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
        mesh = parallel.create_mesh()
        parallel.check_batch_size(config.optim.batch_size, mesh)
        steps = pipeline.steps_per_epoch(
            config.data.dataset,
            config.optim.batch_size,
            config.data.data_dir,
            config.data.train_split,
        )
        model = create_model(config)
        low_mode = low_mode_schedule(config, steps)
        if low_mode is not None:
            model.check_low_mode(low_mode.mode)
            image_size = pipeline.dataset_spec(config.data.dataset).image_size
            low_mode.mode.input_hw((image_size, image_size))
        tx = create_optimizer(config, steps)
        return cls(config, Path(workdir), model, mesh, tx, steps, low_mode)

    @property
    def total_steps(self) -> int:
        return int(self.config.optim.num_epochs * self.steps_per_epoch)

    @property
    def image_size(self) -> int:
        return pipeline.dataset_spec(self.config.data.dataset).image_size

    @property
    def program_keys(self) -> list[ProgramKey]:
        """Every program a training step can draw (full instance first)."""
        keys: list[ProgramKey] = list(
            self.model.space if self.config.sdpoint.enabled else [Instance.full()]
        )
        if self.low_mode is not None:
            keys.append(self.low_mode.mode)
        return keys

    def initial_draws(self) -> dict[str, int]:
        """Zero counts of the draws that checkpoints keep: every instance of the space,
        and the low mode if on."""
        draws = {str(i): 0 for i in self.model.space}
        if self.low_mode is not None:
            draws[str(self.low_mode.mode)] = 0
        return draws

    def checkpoints(self, subdir: str = "checkpoints", **kwargs: Any) -> CheckpointManager:
        return CheckpointManager(self.workdir / subdir, **kwargs)

    def initial_state(self) -> TrainState:
        state = initial_state(self.model, self.tx, self.image_size, self.config.seed)
        return parallel.replicate(state, self.mesh)

    def restore(self, subdir: str = "checkpoints") -> tuple[TrainState, dict]:
        """The latest checkpoint in ``workdir/subdir``, checked against this config."""
        with self.checkpoints(subdir) as manager:
            checkpoint, saved_config, _ = manager.restore(self.checkpoint_template())
        # flat configs of earlier versions are migrated; a field missing from an older
        # checkpoint's config had its default value then
        saved = config_from_saved(saved_config)
        changed = [
            path
            for path in RESUME_INVARIANTS
            if _jsonable(get_field(saved, path)) != _jsonable(get_field(self.config, path))
        ]
        if changed:
            details = ", ".join(
                f"{p}: {get_field(saved, p)!r} -> {get_field(self.config, p)!r}" for p in changed
            )
            raise CheckpointError(
                f"the checkpoint in {self.workdir / subdir} was written with a different "
                f"config ({details}); use a new --workdir or the original config"
            )
        return checkpoint["state"], checkpoint["draws"]

    def checkpoint_template(self) -> dict[str, Any]:
        return {"state": self.initial_state(), "draws": self.initial_draws()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
