"""Training with SDPoint (Algorithm 1 of the paper), data-parallel and resumable.

Every step draws one instance ``(p, r)`` on the host from a generator seeded by
``(seed, step)`` (so a resumed run draws the same sequence) and runs the train step
compiled for that instance. ``config.sdpoint = False`` trains the plain network with
the same code (every step is the full instance).

Low mode (:mod:`sdpoint_jax.lowmode`, paper 003; off by default): with
``config.low_mode_prob > 0`` (or per-epoch ``config.low_mode_epoch_probs``) each step
first draws, from its own generator seeded by ``(seed, step)``, whether it runs in
low mode. A low-mode step runs the *full* network in low mode (inputs and eligible
kernels downsampled by ``config.low_mode_ratio``); any other step draws an SDPoint
instance exactly as without low mode. So a step is low-mode, an SDPoint instance, or
full, and the instances of the other steps are those of the same run without low
mode. Full mode is forced for ``config.full_mode_epochs_after_drop`` epochs after
each learning-rate drop. Low-mode steps do not update running batch-norm statistics;
evaluation runs in full mode.

Optimisation follows the papers: SGD with Nesterov momentum 0.9 and L2 weight decay
on every parameter (added to the gradient, as PyTorch's ``weight_decay``), and a
step learning-rate schedule (``lr_drop_epochs``, each a ``lr_decay`` factor).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf  # TensorBoard summaries; already loaded by the input pipeline
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sdpoint_jax import data, parallel
from sdpoint_jax.checkpoint import CheckpointError, CheckpointManager, PreemptionFlag
from sdpoint_jax.config import base_config
from sdpoint_jax.conv_lowering import resolve_conv_lowering
from sdpoint_jax.evaluate import evaluate_instances
from sdpoint_jax.instance import Instance, InstanceSpace
from sdpoint_jax.lowmode import LowMode, LowModeSchedule, check_probability
from sdpoint_jax.models import SDPointModel, create
from sdpoint_jax.norm import merge_statistics, trained_statistics
from sdpoint_jax.programs import InstancePrograms, executable_cache

# Config entries that must not change when a run is resumed.
RESUME_INVARIANTS = (
    "dataset",
    "train_split",
    "model",
    "sdpoint",
    "ratios",
    "bn_mode",
    "batch_size",
    "num_epochs",
    "learning_rate",
    "lr_drop_epochs",
    "lr_decay",
    "momentum",
    "weight_decay",
    "seed",
    "low_mode_prob",
    "low_mode_epoch_probs",
    "low_mode_ratio",
    "low_mode_resize",
    "full_mode_epochs_after_drop",
)

ProgramKey = Instance | LowMode
"""What selects a train-step program: an SDPoint instance (in full mode), or a
:class:`LowMode` (the full instance in low mode)."""


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
    spec = data.dataset_spec(config.dataset)
    return create(
        config.model,
        num_classes=spec.num_classes,
        ratios=tuple(config.ratios),
        bn_mode=config.bn_mode,
        dtype=jnp.dtype(config.dtype),
        conv_lowering=resolve_conv_lowering(config.conv_lowering),
    )


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Constant ``learning_rate``, multiplied by ``lr_decay`` at each drop epoch."""
    drops = {round(epoch * steps_per_epoch): config.lr_decay for epoch in config.lr_drop_epochs}
    return optax.piecewise_constant_schedule(config.learning_rate, drops)


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(
            learning_rate_schedule(config, steps_per_epoch),
            momentum=config.momentum,
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
    (:func:`sdpoint_jax.norm.trained_statistics`)."""
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

    ``config.low_mode_epoch_probs`` (one per epoch), when set, replaces the constant
    ``config.low_mode_prob``; setting both is an error.
    """
    per_epoch = config.low_mode_epoch_probs
    check_probability("low_mode_prob", config.low_mode_prob)
    if per_epoch is not None and config.low_mode_prob != 0.0:
        raise ValueError(
            f"set either low_mode_prob ({config.low_mode_prob}) or low_mode_epoch_probs, not both"
        )
    schedule = LowModeSchedule.create(
        LowMode(config.low_mode_ratio, config.low_mode_resize),
        config.low_mode_prob if per_epoch is None else tuple(per_epoch),
        num_epochs=config.num_epochs,
        steps_per_epoch=steps_per_epoch,
        lr_drop_epochs=config.lr_drop_epochs,
        full_epochs_after_drop=config.full_mode_epochs_after_drop,
    )
    return schedule if any(schedule.epoch_probabilities) else None


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
    :func:`sdpoint_jax.norm.trained_statistics`) and then the one parameter-update
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
    programs are also kept across runs (:func:`sdpoint_jax.programs.executable_cache`)."""
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
    "max_steps",
    "log_every_steps",
    "eval_every_epochs",
    "eval_batch_size",
    "eval_split",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "precompile",
    "compile_workers",
    "compile_cache_dir",
    "data_dir",
)


def program_fingerprint(
    config: ml_collections.ConfigDict, model: SDPointModel, steps_per_epoch: int
) -> str:
    """What the train-step programs of a run depend on: the model, the config (but
    :data:`NOT_IN_PROGRAMS`) and the steps per epoch (the learning-rate schedule)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_PROGRAMS}
    config_text = json.dumps(fields, sort_keys=True, default=list)
    return "\n".join([repr(model), config_text, str(steps_per_epoch)])


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
        parallel.check_batch_size(config.batch_size, mesh)
        steps = data.steps_per_epoch(
            config.dataset, config.batch_size, config.data_dir, config.train_split
        )
        model = create_model(config)
        low_mode = low_mode_schedule(config, steps)
        if low_mode is not None:
            model.check_low_mode(low_mode.mode)
            image_size = data.dataset_spec(config.dataset).image_size
            low_mode.mode.input_hw((image_size, image_size))
        tx = create_optimizer(config, steps)
        return cls(config, Path(workdir), model, mesh, tx, steps, low_mode)

    @property
    def total_steps(self) -> int:
        return int(self.config.num_epochs * self.steps_per_epoch)

    @property
    def image_size(self) -> int:
        return data.dataset_spec(self.config.dataset).image_size

    @property
    def program_keys(self) -> list[ProgramKey]:
        """Every program a training step can draw (full instance first)."""
        keys: list[ProgramKey] = list(
            self.model.space if self.config.sdpoint else [Instance.full()]
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
        # a key missing from an older checkpoint's config had its default value then
        defaults = base_config()
        saved = {key: saved_config.get(key, defaults.get(key)) for key in RESUME_INVARIANTS}
        changed = [
            key
            for key in RESUME_INVARIANTS
            if _jsonable(saved[key]) != _jsonable(self.config.get(key))
        ]
        if changed:
            details = ", ".join(f"{k}: {saved[k]!r} -> {self.config.get(k)!r}" for k in changed)
            raise CheckpointError(
                f"the checkpoint in {self.workdir / subdir} was written with a different "
                f"config ({details}); use a new --workdir or the original config"
            )
        return checkpoint["state"], checkpoint["draws"]

    def checkpoint_template(self) -> dict[str, Any]:
        return {"state": self.initial_state(), "draws": self.initial_draws()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, resume: bool) -> TrainState:
    """Trains ``config`` in ``workdir`` (checkpoints in ``workdir/checkpoints``).

    With ``resume`` the latest checkpoint is restored and training continues exactly
    as an uninterrupted run would; without it, an existing checkpoint is an error
    (nothing trained is ever overwritten). SIGTERM saves a checkpoint and returns.
    """
    run = Run.create(config, workdir)
    run.workdir.mkdir(parents=True, exist_ok=True)
    state, draws = _start_state(run, resume)
    start = int(state.step)
    end = run.total_steps if config.max_steps is None else min(config.max_steps, run.total_steps)
    programs = train_programs(
        run.model,
        run.tx,
        state,
        run.mesh,
        config.batch_size,
        run.image_size,
        program_fingerprint(config, run.model, run.steps_per_epoch),
    )
    logger = _MetricsLogger(run.workdir, jax.process_index() == 0)
    if config.precompile:
        compile_start = time.perf_counter()
        programs.precompile(run.program_keys, workers=config.compile_workers)
        logger.write(start, {"compile_seconds": time.perf_counter() - compile_start}, None)
    eval_every = max(1, round(config.eval_every_epochs * run.steps_per_epoch))
    batches = data.train_batches(
        config.dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start,
        data_dir=config.data_dir,
        train_split=config.train_split,
    )
    draws = Counter(draws)
    with (
        run.checkpoints(
            keep_last=config.keep_checkpoints, keep_best=1, best_metric="top1_accuracy"
        ) as manager,
        PreemptionFlag() as preempted,
    ):
        save = functools.partial(_save, manager, config)
        bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=not logger.main)
        schedule = learning_rate_schedule(config, run.steps_per_epoch)
        last_log = (start, time.perf_counter())
        clock = _TrainClock()
        for step, batch in zip(
            range(start, end), parallel.shard_batches(batches, run.mesh), strict=False
        ):
            key = draw_step(run.model.space, config.seed, step, config.sdpoint, run.low_mode)
            draws[str(key)] += 1
            state, metrics = programs[key](state, batch)
            if (step + 1) % config.log_every_steps == 0 or step + 1 == end:
                metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
                now = time.perf_counter()
                images_per_sec = (step + 1 - last_log[0]) * config.batch_size / (now - last_log[1])
                last_log = (step + 1, now)
                logger.write(
                    step + 1,
                    {
                        **metrics,
                        "learning_rate": float(schedule(step)),
                        "images_per_sec": images_per_sec,
                        "train_seconds": clock.seconds(),
                    },
                    key,
                )
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    img_s=f"{images_per_sec:.0f}",
                    instance=str(key),
                )
            bar.update()
            # at most one save per step: a step is never written twice
            if (step + 1) % eval_every == 0 or step + 1 == run.total_steps:
                with clock.paused(state):
                    top1 = _full_accuracy(run, state)
                    logger.write(
                        step + 1,
                        {"eval_top1_accuracy": top1, "train_seconds": clock.seconds()},
                        None,
                    )
                    save(step + 1, state, draws, {"top1_accuracy": top1})
                last_log = (step + 1, time.perf_counter())  # exclude eval from img/s
            elif (step + 1) % config.checkpoint_every_steps == 0 or step + 1 == end or preempted():
                with clock.paused(state):
                    save(step + 1, state, draws, None)
            if preempted():
                logger.note(f"SIGTERM: saved step {step + 1} and stopped")
                break
        bar.close()
    logger.write_draws(int(state.step), dict(sorted(draws.items())))
    logger.close()
    return state


def _start_state(run: Run, resume: bool) -> tuple[TrainState, dict[str, int]]:
    with run.checkpoints() as manager:
        latest = manager.latest_step()
    if latest is None:
        if resume:
            print(f"--resume: no checkpoint in {run.workdir / 'checkpoints'}; starting fresh")
        return run.initial_state(), run.initial_draws()
    if not resume:
        raise CheckpointError(
            f"{run.workdir / 'checkpoints'} already holds a checkpoint (step {latest}); "
            f"pass --resume to continue it, or choose a new --workdir"
        )
    return run.restore()


def _save(manager, config, step, state, draws, metrics) -> None:
    checkpoint = {"state": state, "draws": {k: int(v) for k, v in draws.items()}}
    manager.save(step, checkpoint, config=config.to_dict(), metrics=metrics, force=True)


def _full_accuracy(run: Run, state: TrainState) -> float:
    """Top-1 accuracy (%) of the full instance on the eval split (instance BN)."""
    batches = data.eval_batches(
        run.config.dataset,
        global_batch_size=run.config.eval_batch_size,
        split=run.config.eval_split,
        data_dir=run.config.data_dir,
    )
    (row,) = evaluate_instances(
        run.model,
        state.variables,
        batches,
        [Instance.full()],
        input_hw=(run.image_size, run.image_size),
        bn_modes=("instance",),
        mesh=run.mesh,
    )
    return 100.0 - row["top1_error"]


class _TrainClock:
    """Wall-clock seconds spent in training steps by this invocation (a resumed run
    starts again from 0): evaluation and checkpoint saves are paused out, and the
    clock waits for the device before it pauses, so no step's time is missed."""

    def __init__(self):
        self._start = time.perf_counter()
        self._paused_total = 0.0
        self._paused_at: float | None = None

    def seconds(self) -> float:
        """Training seconds so far (frozen while paused)."""
        now = time.perf_counter() if self._paused_at is None else self._paused_at
        return now - self._start - self._paused_total

    @contextlib.contextmanager
    def paused(self, state: TrainState) -> Iterator[None]:
        jax.block_until_ready(state)
        self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._paused_total += time.perf_counter() - self._paused_at
            self._paused_at = None


class _MetricsLogger:
    """Metrics to ``train_log.jsonl`` and TensorBoard (``workdir/tensorboard``)."""

    def __init__(self, workdir: Path, main: bool):
        self.main = main
        self._jsonl = (workdir / "train_log.jsonl").open("a") if main else None
        self._tb = None
        if main:
            self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float], key: ProgramKey | None) -> None:
        """One log row; ``key`` (the step's instance or low mode) goes in ``"instance"``."""
        if not self.main:
            return
        row = {"step": step, **metrics}
        if key is not None:
            row["instance"] = str(key)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)

    def write_draws(self, step: int, draws: dict[str, int]) -> None:
        """Steps per instance and low mode so far (a ``"draws"`` log row), and prints them."""
        self.note("draws (instances, low mode): " + json.dumps(draws))
        if self.main:
            self._jsonl.write(json.dumps({"step": step, "draws": draws}) + "\n")
            self._jsonl.flush()

    def note(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    def close(self) -> None:
        if self.main:
            self._jsonl.close()
            self._tb.close()
