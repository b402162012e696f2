"""Shared test helpers: tiny models, traced records of what a forward pass did, a tiny
config on the real CIFAR-10 beside the project, one run trained with it for the whole
session, and one persistent compilation cache for the whole session.

Before anything imports JAX or the package, the environment of the session (inherited
by every command a test starts) is set: XLA:CPU flags for fast compilation, and a cache
directory of the session's own, so that tests never read or write the user's
``~/.cache`` and start, as CI does, from an empty one."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# The suite compiles hundreds of small programs and runs each only a few times, so
# tests, and the commands they start (which inherit the environment), ask XLA:CPU for
# fast compilation over fast code: LLVM at -O0, and fusions emitted by the elemental IR
# emitter instead of the fusion emitters. Together they take about a seventh of the
# compile time of a WRN-10-1 train step at twice its run time. The programs compute the
# same functions; XLA reads the flags when its CPU client starts.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# XDG_CACHE_HOME: the default place of the package's compilation caches
# (sdpoint_jax.training.programs.DEFAULT_CACHE_DIR), and of matplotlib's font cache.
# One directory for the whole session: the process that starts pytest makes it (and
# removes it at exit), and its parallel workers, which inherit the environment, share
# it, so that a program one worker compiled is loaded by the others.
_SESSION_CACHE_VARIABLE = "SDPOINT_JAX_TESTS_CACHE_HOME"
if _SESSION_CACHE_VARIABLE in os.environ:
    SESSION_CACHE_HOME = Path(os.environ[_SESSION_CACHE_VARIABLE])
else:
    SESSION_CACHE_HOME = Path(tempfile.mkdtemp(prefix="sdpoint_jax-tests-cache-"))
    os.environ[_SESSION_CACHE_VARIABLE] = str(SESSION_CACHE_HOME)
    atexit.register(shutil.rmtree, SESSION_CACHE_HOME, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = str(SESSION_CACHE_HOME)

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sdpoint_jax.config import cifar_config, get_field, set_field
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import SDPointModel, create
from sdpoint_jax.models.cost import abstract_exit_variables, abstract_variables
from sdpoint_jax.training import parallel
from sdpoint_jax.training.programs import DEFAULT_CACHE_DIR, enable_compilation_cache

# Real CIFAR-10 prepared for tfds beside the project (../shared). Tests that train and
# checkpoint use it: tfds mock data races with orbax's background writes.
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"
needs_cifar10 = pytest.mark.skipif(
    not (SHARED_DATA_DIR / "cifar10").is_dir(),
    reason=f"CIFAR-10 is not prepared in {SHARED_DATA_DIR}",
)


def tiny_cifar10_config(overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The WRN-10-1 CIFAR-10 config on :data:`SHARED_DATA_DIR` with ``overrides`` set,
    keyed by dotted path (``{"optim.batch_size": 16}``; each must be an existing field)."""
    config = cifar_config("wrn-10-1", "cifar10")
    config.data.data_dir = str(SHARED_DATA_DIR)
    for path, value in (overrides or {}).items():
        get_field(config, path)  # KeyError naming a path that is not a field
        set_field(config, path, value)
    return config


def init_variables(model: SDPointModel, hw: tuple[int, int], batch: int = 2):
    """``model.init`` (key 0, the full instance) on zero images ``(batch, *hw, 3)``, as
    one compiled program: eager ``init`` compiles every operation on its own."""
    x = jnp.zeros((batch, *hw, 3), jnp.float32)
    init = functools.partial(model.init, instance=Instance.full(), train=False)
    return jax.jit(init)(jax.random.key(0), x)


def run_gradients(programs, key, state, batch: dict, mesh) -> Any:
    """The gradient program of ``key`` of ``programs`` (a
    :class:`sdpoint_jax.training.steps.TrainPrograms`) run on ``state``'s parameters,
    its statistics for ``key`` and step, and ``batch``, on the host (``state`` is
    copied: the program donates the statistics)."""
    stats = programs.trainee.trained_statistics(state.batch_stats, key)
    params, stats, step = parallel.replicate((state.params, stats, state.step), mesh)
    batch = parallel.shard_batch(batch, mesh)
    return jax.device_get(programs.gradients[key](params, stats, batch, step))


def record_calls(
    model: SDPointModel,
    variables,
    x: jax.Array,
    instance: Instance,
    module_type: type,
    *,
    train: bool = False,
    keep: Callable = lambda args, out: (args[0].shape, out.shape),
    abstract: bool = False,
) -> list:
    """Runs one forward pass and returns ``keep(args, output)`` for every call of a
    module of ``module_type``, in call order. ``abstract=True`` traces with
    ``jax.eval_shape`` (fast; ``keep`` may then only look at shapes)."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, module_type):
            calls.append(keep(args, out))
        return out

    mutable = ["batch_stats"] if train else False
    apply = functools.partial(model.apply, instance=instance, train=train, mutable=mutable)
    with nn.intercept_methods(interceptor):
        (jax.eval_shape if abstract else lambda f, *a: f(*a))(apply, variables, x)
    return calls


@pytest.fixture(scope="session")
def tiny_wrn():
    model = create("wrn-10-1", num_classes=10)
    return model, init_variables(model, (16, 16))


# The training split is read into memory at the start of every run: keep it small.
TRAIN_SPLIT = "train[:1024]"


def tiny_config(max_steps: int):
    return tiny_cifar10_config(
        {
            "optim.batch_size": 16,
            "run.max_steps": max_steps,
            "data.train_split": TRAIN_SPLIT,
            "run.log_every_steps": 1,
            "run.eval_every_epochs": 1000.0,  # no evaluation inside these short runs
            "data.eval_split": "test[:48]",
            "data.eval_batch_size": 16,
            "sdpoint.calibration_batches": 2,
        },
    )


@pytest.fixture(scope="session")
def compilation_cache_dir() -> Path:
    """JAX's persistent compilation cache of the whole session (kept executables beside
    it), the default cache of every command a test starts or runs in this process: a
    program compiled once is loaded afterwards. Tests that count cache hits or writes
    use caches of their own."""
    assert DEFAULT_CACHE_DIR.is_relative_to(SESSION_CACHE_HOME), DEFAULT_CACHE_DIR
    return DEFAULT_CACHE_DIR / "xla"


@pytest.fixture(autouse=True)
def compilation_cache(compilation_cache_dir: Path) -> None:
    """Every test starts with the session's compilation cache on, wherever an earlier
    test (or a command it ran in this process) pointed JAX."""
    enable_compilation_cache(compilation_cache_dir)


# Steps of the session's trained run (:func:`trained_run`).
TRAINED_STEPS = 6


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run directory trained with ``tiny_config(TRAINED_STEPS)`` and the state that
    training returned."""

    workdir: Path
    state: Any

    def copy(self, directory: Path) -> Path:
        """A copy of the run directory at ``directory`` (for tests that write into it)."""
        shutil.copytree(self.workdir, directory)
        return directory


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, compilation_cache_dir: Path) -> TrainedRun:
    """WRN-10-1 trained ``TRAINED_STEPS`` steps on real CIFAR-10 (``tiny_config``):
    neither calibrated nor evaluated. Shared by every test that reads a trained run: no
    test writes into it (tests that do work on :meth:`TrainedRun.copy`)."""
    from sdpoint_jax.training.loop import train  # TensorFlow: only where a run trains

    enable_compilation_cache(compilation_cache_dir)  # set up before any test's fixtures
    workdir = tmp_path_factory.mktemp("trained_run")
    return TrainedRun(workdir, train(tiny_config(TRAINED_STEPS), workdir, resume=False))


def losses(workdir: Path) -> list[tuple[int, float, str]]:
    rows = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["instance"]) for r in rows if "loss" in r]


HW = (16, 16)


BATCH = 8


NUM_BATCHES = 3


def random_variables(model: SDPointModel | nn.Module, seed: int, hw: tuple[int, int] = HW) -> dict:
    """Variables of ``model`` (an SDPoint model or a network with exits) at ``hw``
    drawn from ``seed`` without running ``init`` (no program compiles):
    He-scaled kernels, BN scale ~ 1, biases ~ 0, and batch-norm statistics that differ
    from key to key (means N(0, 1), variances U(0.5, 2))."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name, shape = path[-1].key, leaf.shape
        if name == "mean":
            value = rng.normal(size=shape)
        elif name == "var":
            value = rng.uniform(0.5, 2.0, shape)
        elif len(shape) > 1:
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        else:
            value = (name == "scale") + 0.1 * rng.normal(size=shape)
        return jnp.asarray(value, leaf.dtype)

    shapes = (
        abstract_exit_variables(model, hw)
        if hasattr(model, "num_exits")
        else abstract_variables(model, hw)
    )
    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_batches(seed: int, count: int = NUM_BATCHES, size: int = BATCH) -> list[dict]:
    """``count`` batches of ``size`` random 16x16 images (shifted, scaled) and labels."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": (1.5 * rng.normal(size=(size, *HW, 3)) + 0.3).astype(np.float32),
            "label": rng.integers(0, 10, size).astype(np.int32),
        }
        for _ in range(count)
    ]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The test files marked ``first`` (a minute or more each) run first, in collection
    order otherwise: a parallel run (whole files to a process, in this order) then does
    not end with one process alone on one of them."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``--numprocesses=auto`` (pyproject.toml): one process more than this machine's
    cores (then at most ``--maxprocesses``). Many tests wait on a command they started
    or on a server, and an extra process keeps the cores busy meanwhile: on 2 cores, 3
    processes ran the suite in 560 s where 2 took 594 s.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides where it is set."""
    if "PYTEST_XDIST_AUTO_NUM_WORKERS" in os.environ:
        return None  # pytest-xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) + 1
