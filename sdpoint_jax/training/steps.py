"""The train step of one program key (an SDPoint instance, or the full instance in a
low mode) and its compiled programs: a gradient program per key and one shared
parameter update (:class:`TrainPrograms`).
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
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.lowmode import LowMode
from sdpoint_jax.core.norm import merge_statistics, trained_statistics
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.training import parallel
from sdpoint_jax.training.programs import InstancePrograms, executable_cache
from sdpoint_jax.training.run import TrainState
from sdpoint_jax.training.schedules import ProgramKey


def gradient_step(
    params: Any,
    batch_stats: Any,
    batch: dict[str, jax.Array],
    *,
    model: SDPointModel,
    instance: Instance,
    low_mode: LowMode | None = None,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Forward and backward pass of ``instance`` on ``batch`` (images ``(B, H, W, 3)``,
    int labels), in low mode if ``low_mode`` is given (the model downsamples the
    images): the loss's gradients (shaped like ``params``), ``batch_stats`` updated and
    ``{"loss", "accuracy"}`` of the batch. ``batch_stats`` holds every running
    batch-norm statistic, or only those the step updates
    (:func:`sdpoint_jax.core.norm.trained_statistics`)."""
    model.check_low_mode(low_mode)
    mode = {} if low_mode is None else {"low_mode": low_mode}

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            instance=instance,
            train=True,
            mutable=["batch_stats"],
            **mode,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, updates.get("batch_stats", {}))  # none in low mode

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return grads, batch_stats, {"loss": loss, "accuracy": accuracy}


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
    model: SDPointModel,
    tx: optax.GradientTransformation,
    instance: Instance,
    low_mode: LowMode | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step of ``instance`` on ``batch`` (:func:`gradient_step`, then
    :func:`update_step`) as one function; :func:`train_programs` compiles the two
    parts as separate programs."""
    grads, batch_stats, metrics = gradient_step(
        state.params, state.batch_stats, batch, model=model, instance=instance, low_mode=low_mode
    )
    return update_step(state.replace(batch_stats=batch_stats), grads, tx=tx), metrics


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


UPDATE_KEY = "update"
"""The key of the parameter-update program in :attr:`TrainPrograms.update`."""


def _instance_and_low_mode(key: ProgramKey) -> tuple[Instance, LowMode | None]:
    """What a step of ``key`` runs: an instance in full mode, or the full instance in
    a low mode."""
    return (Instance.full(), key) if isinstance(key, LowMode) else (key, None)


def _trained_instance(key: ProgramKey) -> Instance | None:
    """The instance whose batch-norm statistics a step of ``key`` updates (None for a
    low mode, which updates none)."""
    instance, low_mode = _instance_and_low_mode(key)
    return None if low_mode is not None else instance


@dataclasses.dataclass(frozen=True)
class TrainPrograms:
    """The compiled train step of every :data:`ProgramKey`, as two programs.

    A step runs its key's gradient program (:func:`gradient_step`: forward, backward,
    and the running batch-norm statistics of that instance alone,
    :func:`sdpoint_jax.core.norm.trained_statistics`) and then the one parameter-update
    program (:func:`update_step`) that every key shares. Compiling the optimizer once,
    and passing a program only the statistics it updates (not every instance's, 650 of
    a WRN-28-10 step's 840 arguments), makes the ``2N + 1`` programs cheaper to load:
    on CPU a WRN-28-10 gradient program loads from the executable cache in 0.27 s,
    the whole step as one program with every statistic in 0.39 s, so all 25 steps load
    in 4.5 s instead of 5.9 s (``benchmarks/README.md``). Step time is unchanged within
    noise (the gradients were materialised inside the single program too).

    ``programs[key](state, batch) -> (state, {"loss", "accuracy"})`` runs a step,
    compiling what it needs on first use; the state is consumed (donated).
    """

    gradients: InstancePrograms
    update: InstancePrograms

    def __getitem__(self, key: ProgramKey) -> Any:
        gradients, update = self.gradients[key], self.update[UPDATE_KEY]
        instance = _trained_instance(key)

        def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Any]:
            trained = trained_statistics(state.batch_stats, instance)
            grads, trained, metrics = gradients(state.params, trained, batch)
            batch_stats = merge_statistics(state.batch_stats, trained)
            return update(state.replace(batch_stats=batch_stats), grads), metrics

        return step

    def __len__(self) -> int:
        """Gradient programs compiled so far (one per key used)."""
        return len(self.gradients)

    def precompile(self, keys: Iterable[ProgramKey], *, workers: int | None = None) -> None:
        """Compiles the update program and every key's gradient program not compiled
        yet (``workers`` gradient programs at a time, beside the update program)."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            update = pool.submit(self.update.__getitem__, UPDATE_KEY)
            self.gradients.precompile(keys, workers=workers)
            update.result()


def train_programs(
    model: SDPointModel,
    tx: optax.GradientTransformation,
    state: TrainState,
    mesh: Mesh,
    batch_size: int,
    image_size: int,
    fingerprint: str | None = None,
) -> TrainPrograms:
    """Train steps keyed by :data:`ProgramKey` (an instance, or a low mode of the full
    instance): state replicated (and donated), batch sharded on the mesh's data axis.
    With a ``fingerprint`` (of everything ``model`` and ``tx`` depend on, e.g.
    :func:`program_fingerprint`) and the persistent compilation cache on, compiled
    programs are also kept across runs (:func:`sdpoint_jax.training.programs.executable_cache`)."""
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def build_gradients(key: ProgramKey):
        instance, low_mode = _instance_and_low_mode(key)
        step = functools.partial(gradient_step, model=model, instance=instance, low_mode=low_mode)
        return jax.jit(
            step,
            in_shardings=(replicated, replicated, batch_sharding),
            out_shardings=replicated,
            donate_argnums=1,  # the statistics; the parameters go on to the update
        )

    def build_update(key: str):
        return jax.jit(
            functools.partial(update_step, tx=tx),
            in_shardings=(replicated, replicated),
            out_shardings=replicated,
            donate_argnums=0,
        )

    batch = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, image_size, image_size, 3), jnp.float32, sharding=batch_sharding
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding),
    }
    executables = None if fingerprint is None else executable_cache(fingerprint)
    state = abstract_like(state, replicated)

    def gradient_args(key: ProgramKey) -> tuple:
        return state.params, trained_statistics(state.batch_stats, _trained_instance(key)), batch

    return TrainPrograms(
        gradients=InstancePrograms(build_gradients, gradient_args, "train steps", executables),
        update=InstancePrograms(
            build_update, (state, state.params), "parameter update", executables
        ),
    )


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
    config: ml_collections.ConfigDict, model: SDPointModel, steps_per_epoch: int
) -> str:
    """What the train-step programs of a run depend on: the model, the config (but
    :data:`NOT_IN_PROGRAMS`, dotted paths) and the steps per epoch (the learning-rate
    schedule)."""
    fields = {k: v for k, v in flatten(config.to_dict()).items() if k not in NOT_IN_PROGRAMS}
    config_text = json.dumps(fields, sort_keys=True, default=list)
    return "\n".join([repr(model), config_text, str(steps_per_epoch)])
