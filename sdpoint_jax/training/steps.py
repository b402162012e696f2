"""The train step of one setting of a :class:`~sdpoint_jax.training.trainee.Trainee`
(for SDPoint an instance, or the full instance in a low mode) and its compiled
programs: a gradient program per setting and one shared parameter update
(:class:`TrainPrograms`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from sdpoint_jax.config import flatten
from sdpoint_jax.core.norm import merge_statistics
from sdpoint_jax.training import parallel
from sdpoint_jax.training.programs import ExecutableCache, InstancePrograms, executable_cache
from sdpoint_jax.training.run import TrainState
from sdpoint_jax.training.trainee import Setting, Trainee, step_key
from sdpoint_jax.xla_cpu.compiler_options import train_compiler_options
from sdpoint_jax.xla_cpu.conv_lowering import resolve_conv_lowering, with_conv_lowering


def gradient_step(
    params: Any,
    batch_stats: Any,
    batch: dict[str, jax.Array],
    step: jax.Array,
    *,
    trainee: Trainee,
    setting: Setting,
    seed: int = 0,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Forward and backward pass of ``setting`` on ``batch`` (images ``(B, H, W, 3)``,
    int labels) at training step ``step`` (its random key is
    :func:`~sdpoint_jax.training.trainee.step_key` of ``seed`` and ``step``; a trainee
    that draws no randomness leaves the argument out of the compiled program): the
    loss's gradients (shaped like ``params``), ``batch_stats`` updated and ``{"loss",
    "accuracy"}`` of the batch. ``batch_stats`` holds every running batch-norm
    statistic, or only those the step updates (:meth:`Trainee.trained_statistics`)."""

    def loss_fn(params):
        return trainee.loss(
            params, {"batch_stats": batch_stats}, batch, setting, step_key(seed, step)
        )

    (loss, (collections, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return grads, collections.get("batch_stats", {}), {"loss": loss, "accuracy": accuracy}


def update_step(state: TrainState, grads: Any, *, tx: optax.GradientTransformation) -> TrainState:
    """The optimizer step: ``state`` with ``grads`` applied and ``step`` advanced. It is
    the same for every instance and low mode."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    trainee: Trainee,
    tx: optax.GradientTransformation,
    setting: Setting,
    seed: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step of ``setting`` on ``batch`` (:func:`gradient_step`, then
    :func:`update_step`) as one function, with every running statistic;
    :func:`train_programs` compiles the two parts as separate programs."""
    grads, batch_stats, metrics = gradient_step(
        state.params,
        state.batch_stats,
        batch,
        state.step,
        trainee=trainee,
        setting=setting,
        seed=seed,
    )
    return update_step(state.replace(batch_stats=batch_stats), grads, tx=tx), metrics


UPDATE_KEY = "update"
"""The key of the parameter-update program in :attr:`TrainPrograms.update`."""


@dataclasses.dataclass(frozen=True)
class TrainPrograms:
    """The compiled train step of every setting of a trainee, as two programs.

    A step runs its setting's gradient program (:func:`gradient_step`: forward,
    backward, and only the running statistics the setting updates, e.g. those of one
    SDPoint instance, :meth:`Trainee.trained_statistics`) and then the one
    parameter-update program (:func:`update_step`) that every setting shares.
    Compiling the optimizer once, and passing a program only the statistics it
    updates (not every instance's), makes the ``2N + 1`` programs cheaper to load from
    the executable cache than one whole-step program per instance, at the same step
    time (figures: ``benchmarks/README.md``, "Compilation").

    ``programs[key](state, batch) -> (state, {"loss", "accuracy"})`` runs a step,
    compiling what it needs on first use; the state is consumed (donated).

    Attributes:
      trainee: what is trained; it says which statistics a step of a setting updates.
      gradients: the gradient program of each setting.
      update: the parameter-update program, under :data:`UPDATE_KEY`.
    """

    trainee: Trainee
    gradients: InstancePrograms
    update: InstancePrograms

    def __getitem__(self, key: Setting) -> Any:
        gradients, update = self.gradients[key], self.update[UPDATE_KEY]

        def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Any]:
            trained = self.trainee.trained_statistics(state.batch_stats, key)
            grads, trained, metrics = gradients(state.params, trained, batch, state.step)
            batch_stats = merge_statistics(state.batch_stats, trained)
            return update(state.replace(batch_stats=batch_stats), grads), metrics

        return step

    def __len__(self) -> int:
        """Gradient programs compiled so far (one per key used)."""
        return len(self.gradients)

    def precompile(self, keys: Iterable[Setting], *, workers: int | None = None) -> None:
        """Compiles the update program and every key's gradient program not compiled
        yet (``workers`` gradient programs at a time, beside the update program)."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            update = pool.submit(self.update.__getitem__, UPDATE_KEY)
            self.gradients.precompile(keys, workers=workers)
            update.result()


def train_programs(
    trainee: Trainee,
    tx: optax.GradientTransformation,
    state: TrainState,
    mesh: Mesh,
    batch_size: int,
    image_size: int,
    fingerprint: str | None = None,
    *,
    conv_lowering: str,
    seed: int = 0,
    platform: str | None = None,
    cpu_optimization_level: int | None = None,
) -> TrainPrograms:
    """Train steps of ``trainee`` keyed by setting (for SDPoint an instance, or a low
    mode of the full instance): state replicated (and donated), batch sharded on the
    mesh's data axis; step ``s`` draws its randomness from ``(seed, s)``.

    ``conv_lowering`` (one of :data:`sdpoint_jax.xla_cpu.conv_lowering.CONV_LOWERINGS`,
    ``"auto"`` resolved for ``platform``, default the default backend's) lowers the
    convolutions of the gradient programs
    (:func:`sdpoint_jax.xla_cpu.conv_lowering.with_conv_lowering`); a ``platform``
    other than this machine's is for lowering only (:meth:`InstancePrograms.trace`
    of :attr:`TrainPrograms.gradients`, ``mesh`` possibly a
    ``jax.sharding.AbstractMesh``). ``cpu_optimization_level``: XLA:CPU's backend
    optimisation level for both programs (None: XLA's default;
    :func:`sdpoint_jax.xla_cpu.compiler_options.train_compiler_options`).
    With a ``fingerprint`` (of everything ``trainee`` and ``tx`` depend on, e.g.
    :func:`program_fingerprint`) and the persistent compilation cache on, compiled
    programs are also kept across runs (:func:`sdpoint_jax.training.programs.executable_cache`),
    the gradient programs under ``fingerprint`` and the resolved lowering."""
    lowering = resolve_conv_lowering(conv_lowering, platform)
    compiler_options = train_compiler_options(cpu_optimization_level, platform)
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def build_gradients(key: Setting):
        step = functools.partial(gradient_step, trainee=trainee, setting=key, seed=seed)
        return jax.jit(
            with_conv_lowering(step, lowering),
            in_shardings=(replicated, replicated, batch_sharding, replicated),
            out_shardings=replicated,
            donate_argnums=1,  # the statistics; the parameters go on to the update
            compiler_options=compiler_options,
        )

    def build_update(key: str):
        return jax.jit(
            functools.partial(update_step, tx=tx),
            in_shardings=(replicated, replicated),
            out_shardings=replicated,
            donate_argnums=0,
            compiler_options=compiler_options,
        )

    batch = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, image_size, image_size, 3), jnp.float32, sharding=batch_sharding
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding),
    }
    state = parallel.abstract_like(state, replicated)
    lowered_fingerprint = (
        None if fingerprint is None else f"{fingerprint}\nconv_lowering={lowering}"
    )

    def gradient_args(key: Setting) -> tuple:
        trained = trainee.trained_statistics(state.batch_stats, key)
        return state.params, trained, batch, state.step

    return TrainPrograms(
        trainee=trainee,
        gradients=InstancePrograms(
            build_gradients,
            gradient_args,
            "train steps",
            _executables(lowered_fingerprint),
        ),
        update=InstancePrograms(
            build_update, (state, state.params), "parameter update", _executables(fingerprint)
        ),
    )


def _executables(fingerprint: str | None) -> ExecutableCache | None:
    """The executable cache for programs described by ``fingerprint`` (None without
    one)."""
    return None if fingerprint is None else executable_cache(fingerprint)


# Config entries that do not change a train-step program.
NOT_IN_PROGRAMS = (
    "run.max_steps",
    "run.log_every_steps",
    "run.eval_every_epochs",
    "data.eval_batch_size",
    "data.eval_split",
    "run.checkpoint_every_steps",
    "run.keep_checkpoints",
    "compile.precompile",
    "compile.workers",
    "compile.cache_dir",
    "data.data_dir",
)


def program_fingerprint(
    config: ml_collections.ConfigDict, trainee: Trainee, steps_per_epoch: int
) -> str:
    """What the train-step programs of a run depend on: the trainee (its model), the
    config (but :data:`NOT_IN_PROGRAMS`) and the steps per epoch (the learning-rate
    schedule). :func:`train_programs` adds the resolved convolution lowering (the
    config may say ``"auto"``)."""
    fields = {k: v for k, v in flatten(config.to_dict()).items() if k not in NOT_IN_PROGRAMS}
    config_text = json.dumps(fields, sort_keys=True, default=list)
    return "\n".join([repr(trainee), config_text, str(steps_per_epoch)])
