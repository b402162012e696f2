"""What every command that touches a run needs: its config, model, mesh, optimizer,
initial state and checkpoints (:class:`Run`), the :class:`TrainState` a train step
reads and writes, and the state evaluation uses (:func:`restore_for_evaluation`).

Optimisation follows the papers: SGD with Nesterov momentum 0.9 and L2 weight decay
on every parameter (added to the gradient, as PyTorch's ``weight_decay``), and a
step learning-rate schedule (:func:`sdpoint_jax.training.schedules.learning_rate_schedule`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from sdpoint_jax.config import config_from_saved, get_field
from sdpoint_jax.data.specs import dataset_spec
from sdpoint_jax.models import SDPointModel, create
from sdpoint_jax.training import parallel
from sdpoint_jax.training.checkpoint import CheckpointError, CheckpointManager
from sdpoint_jax.training.run_dir import CALIBRATED, RunDir, Source
from sdpoint_jax.training.schedules import (
    learning_rate_schedule,
    low_mode_schedule,
)
from sdpoint_jax.training.trainee import SDPointTrainee, Setting, Trainee

# Config entries that must not change when a run is resumed.
RESUME_INVARIANTS = (
    "data.dataset",
    "data.train_split",
    "data.train_examples_per_class",
    "data.augment",
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
    spec = dataset_spec(config.data.dataset)
    return create(
        config.model.name,
        num_classes=spec.num_classes,
        ratios=tuple(config.sdpoint.ratios),
        bn_mode=config.sdpoint.bn_mode,
        dtype=jnp.dtype(config.model.dtype),
    )


def create_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    trainable: Callable[[Any], Any | None] | None = None,
) -> optax.GradientTransformation:
    """SGD of ``config.optim`` (module docstring). ``trainable(params)`` (a
    :meth:`Trainee.trainable`): the parameters it marks False get no update at all."""
    tx = optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay),
        optax.sgd(
            learning_rate_schedule(config, steps_per_epoch),
            momentum=config.optim.momentum,
            nesterov=True,
        ),
    )
    if trainable is None:
        return tx

    def labels(params: Any) -> Any:
        mask = trainable(params)
        if mask is None:
            return jax.tree.map(lambda _: "train", params)
        return jax.tree.map(lambda on: "train" if on else "frozen", mask)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def initial_state(
    trainee: Trainee, tx: optax.GradientTransformation, image_size: int, seed: int
) -> TrainState:
    """Step 0 of a run seeded by ``seed``: the trainee's fresh variables for square
    images of side ``image_size`` and the optimizer's initial state."""
    variables = trainee.init_variables(jax.random.key(seed), image_size)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Training steps per epoch of ``config``'s training split and global batch size
    (read from the prepared data set: TensorFlow is imported here, not with this module,
    so that programs that only build models and steps start without it)."""
    from sdpoint_jax.data import pipeline

    return pipeline.steps_per_epoch(
        config.data.dataset,
        config.optim.batch_size,
        config.data.data_dir,
        config.data.train_split,
        config.data.train_examples_per_class,
    )


@dataclasses.dataclass
class Run:
    """What every subcommand needs: config, what is trained, mesh, optimizer,
    checkpoints.

    :meth:`create` builds the SDPoint run of a config (:class:`SDPointTrainee`);
    :meth:`for_trainee` a run of any :class:`Trainee` (the comparison's methods).
    """

    config: ml_collections.ConfigDict
    workdir: Path
    trainee: Trainee
    mesh: Mesh
    tx: optax.GradientTransformation
    steps_per_epoch: int

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
        mesh = parallel.create_mesh()
        parallel.check_batch_size(config.optim.batch_size, mesh)
        steps = steps_per_epoch(config)
        low_mode = low_mode_schedule(config, steps)
        if low_mode is not None:
            image_size = dataset_spec(config.data.dataset).image_size
            low_mode.mode.input_hw((image_size, image_size))
        trainee = SDPointTrainee(create_model(config), config.sdpoint.enabled, low_mode)
        return cls(config, Path(workdir), trainee, mesh, create_optimizer(config, steps), steps)

    @classmethod
    def for_trainee(
        cls, trainee: Trainee, config: ml_collections.ConfigDict, workdir: str | Path, mesh: Mesh
    ) -> Run:
        """A run of ``trainee`` with ``config``'s data, schedule and seed (the optimizer
        updates the parameters :meth:`Trainee.trainable` marks)."""
        parallel.check_batch_size(config.optim.batch_size, mesh)
        steps = steps_per_epoch(config)
        freezes = type(trainee).trainable is not Trainee.trainable
        tx = create_optimizer(config, steps, trainee.trainable if freezes else None)
        return cls(config, Path(workdir), trainee, mesh, tx, steps)

    @property
    def model(self) -> SDPointModel:
        """The trained network (every trainee has one)."""
        return self.trainee.model

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.workdir)

    @property
    def total_steps(self) -> int:
        return int(self.config.optim.num_epochs * self.steps_per_epoch)

    @property
    def image_size(self) -> int:
        return dataset_spec(self.config.data.dataset).image_size

    @property
    def program_keys(self) -> list[Setting]:
        """Every program a training step can draw (SDPoint: full instance first)."""
        return list(self.trainee.program_keys())

    def initial_draws(self) -> dict[str, int]:
        """Zero counts of the draws that checkpoints keep (SDPoint: every instance of
        the space, and the low mode if on)."""
        return dict.fromkeys(self.trainee.draw_names(), 0)

    def checkpoints(self, directory: Path | None = None, **kwargs: Any) -> CheckpointManager:
        """A manager of ``directory`` (default: the training checkpoints)."""
        return CheckpointManager(directory or self.run_dir.checkpoints, **kwargs)

    def initial_state(self) -> TrainState:
        state = initial_state(self.trainee, self.tx, self.image_size, self.config.seed)
        return parallel.replicate(state, self.mesh)

    def restore(
        self, directory: Path | None = None, *, step: int | None = None, fall_back: bool = False
    ) -> tuple[TrainState, dict]:
        """Checkpoint ``step`` (default: the latest) in ``directory`` (default: the
        training checkpoints), checked against this config. With ``fall_back`` (and no
        ``step``), the newest intact one: damaged newer steps are moved aside
        (:meth:`CheckpointManager.restore_newest_intact`)."""
        directory = directory or self.run_dir.checkpoints
        with self.checkpoints(directory) as manager:
            if fall_back and step is None:
                restored = manager.restore_newest_intact(self.checkpoint_template())
            else:
                restored = manager.restore(self.checkpoint_template(), step)
            checkpoint, saved_config, _ = restored
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
                f"the checkpoint in {directory} was written with a different "
                f"config ({details}); use a new --workdir or the original config"
            )
        return checkpoint["state"], checkpoint["draws"]

    def abstract_state(self) -> TrainState:
        """The shapes, dtypes and (replicated) shardings of :meth:`initial_state`, traced
        without computing it: a checkpoint is restored onto this."""
        shapes = jax.eval_shape(
            lambda: initial_state(self.trainee, self.tx, self.image_size, self.config.seed)
        )
        return parallel.abstract_like(shapes, parallel.replicated(self.mesh))

    def checkpoint_template(self) -> dict[str, Any]:
        return {"state": self.abstract_state(), "draws": self.initial_draws()}


def restore_for_evaluation(
    config: ml_collections.ConfigDict, workdir: str | Path
) -> tuple[Run, TrainState, Source]:
    """The run in ``workdir`` and the state evaluation, analyses and export use
    (:meth:`RunDir.evaluation_source`): the calibrated statistics if they are of the
    latest training step, else the latest training checkpoint's running averages.

    Returns:
      ``(run, state, source)``; ``source`` says which step and statistics ``state`` is.

    Raises:
      FileNotFoundError: ``workdir`` holds no training checkpoint.
      CheckpointError: the checkpoint is unreadable or of another config.
    """
    run_dir = RunDir(workdir)
    current = run_dir.evaluation_source()
    if current is None:
        raise FileNotFoundError(
            f"no trained run in {run_dir.path}: no checkpoint in {run_dir.checkpoints} (train "
            f"one with `python -m sdpoint_jax.main train --config CFG --workdir {run_dir.path}`)"
        )
    calibrated = run_dir.calibrated_step()
    if calibrated is not None and current.statistics != CALIBRATED:
        print(f"calibration is of step {calibrated}, training is at {current.step}: not using it")
    run = Run.create(config, workdir)
    directory = run_dir.calibrated if current.statistics == CALIBRATED else run_dir.checkpoints
    state, _ = run.restore(directory)
    return run, state, Source(int(state.step), current.statistics)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
