"""The train-step programs that the ``train`` and ``compile`` benchmarks measure.

They are built exactly as training builds them (:func:`sdpoint_jax.training.steps.train_programs`:
state replicated and donated, batch sharded over every device, convolutions lowered
by the target's ``conv_lowering``), with the paper's optimizer for the target's data
set.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
from jax.sharding import Mesh

from sdpoint_jax.bench.options import Target
from sdpoint_jax.bench.values import zeros_like
from sdpoint_jax.config import cifar_config, imagenet_config
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import TrainState, create_optimizer, initial_state
from sdpoint_jax.training.steps import TrainPrograms, train_programs
from sdpoint_jax.training.trainee import SDPointTrainee

STEPS_PER_EPOCH = 1000
"""Lays out the learning-rate schedule; it does not change the cost of a step."""


def run_config(target: Target) -> ml_collections.ConfigDict:
    """The paper's training configuration for the target's model and data set."""
    if target.dataset == "imagenet2012":
        return imagenet_config(target.model_name)
    return cifar_config(target.model_name, target.dataset)


@dataclasses.dataclass(frozen=True)
class TrainSteps:
    """Train-step programs of every instance, and a state to run them on.

    Attributes:
      mesh: the data-parallel mesh over every device.
      state: a train state of zeros (:mod:`sdpoint_jax.bench.values`), replicated over
        the mesh and consumed (donated) by the first step run on it; abstract
        (``jax.ShapeDtypeStruct`` leaves) when only compiling.
      programs: one compiled train step per instance, compiled on first use.
    """

    mesh: Mesh
    state: TrainState
    programs: TrainPrograms

    @classmethod
    def create(
        cls,
        target: Target,
        model: SDPointModel,
        batch_size: int,
        *,
        abstract: bool = False,
        keep_executables: bool = False,
    ) -> TrainSteps:
        """Steps of global batch ``batch_size``; ``ValueError`` unless the device count
        divides it. ``keep_executables``: programs are also kept in (and loaded from)
        the executable cache beside the persistent compilation cache."""
        mesh = parallel.create_mesh()
        parallel.check_batch_size(batch_size, mesh)
        tx = create_optimizer(run_config(target), STEPS_PER_EPOCH)
        trainee = SDPointTrainee(model)
        init = functools.partial(initial_state, trainee, tx, target.image_size, 0)
        state = jax.eval_shape(init)
        if not abstract:
            state = parallel.replicate(zeros_like(state), mesh)
        fingerprint = repr((model, target, STEPS_PER_EPOCH)) if keep_executables else None
        programs = train_programs(
            trainee,
            tx,
            state,
            mesh,
            batch_size,
            target.image_size,
            fingerprint,
            conv_lowering=target.conv_lowering,
            cpu_optimization_level=target.cpu_optimization_level,
        )
        return cls(mesh, state, programs)
