"""The convolution lowering is a policy of the programs that train_programs builds:
its gradient programs equal the train step traced with the lowering's convolution,
also when compiled on other threads; inference and calibration programs of the same
model keep XLA's convolutions; kept executables are keyed by the lowering."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from sdpoint_jax.core.convolution import conv_implementation
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.evaluation.calibrate import _batch_moments_fn
from sdpoint_jax.evaluation.evaluate import _counts_fn
from sdpoint_jax.models import create
from sdpoint_jax.training import parallel
from sdpoint_jax.training.programs import enable_compilation_cache
from sdpoint_jax.training.run import create_optimizer, initial_state
from sdpoint_jax.training.steps import UPDATE_KEY, gradient_step, train_programs
from sdpoint_jax.training.trainee import SDPointTrainee
from sdpoint_jax.xla_cpu.conv_lowering import conv_matmul_grad, with_conv_lowering
from tests.conftest import record_calls, run_gradients, tiny_config

BATCH, SIZE = 2, 32
KEYS = (Instance.full(), Instance(2, 0.5))


@pytest.fixture(scope="module")
def setup():
    """WRN-10-1 (its 1x1 shortcuts take the matrix products), a host copy of its
    initial state, a batch and the one-device mesh."""
    model = create("wrn-10-1")
    tx = create_optimizer(tiny_config(1), steps_per_epoch=1000)
    state = jax.tree.map(np.array, initial_state(SDPointTrainee(model), tx, SIZE, seed=0))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
        "label": rng.integers(0, 10, BATCH).astype(np.int32),
    }
    return model, tx, state, batch, parallel.create_mesh()


def _reference(model, key, state, batch, implementation):
    """``gradient_step`` traced on this thread with ``implementation`` computing every
    convolution: its outputs and its optimised HLO's convolution count."""
    trainee = SDPointTrainee(model)
    step = jax.jit(functools.partial(gradient_step, trainee=trainee, setting=key))
    args = (state.params, trainee.trained_statistics(state.batch_stats, key), batch, state.step)
    with conv_implementation(implementation):
        compiled = step.lower(*args).compile()
    return jax.device_get(compiled(*args)), _convolutions(compiled)


def _convolutions(compiled) -> int:
    return compiled.as_text().count(" convolution(")


def _equal(a, b) -> bool:
    """Whether two pytrees have the same structure and bit-identical leaves."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _traced_step(model, key, state, batch, lowering: str | None = None):
    """The train step of ``key`` traced on this thread, with ``lowering`` or none."""
    trainee = SDPointTrainee(model)
    step = functools.partial(gradient_step, trainee=trainee, setting=key)
    if lowering is not None:
        step = with_conv_lowering(step, lowering)
    stats = trainee.trained_statistics(state.batch_stats, key)
    return jax.jit(step).trace(state.params, stats, batch, state.step)


def _lowered_convolutions(traced) -> int:
    return traced.lower().as_text().count("stablehlo.convolution")


def test_gradient_programs_are_the_step_traced_with_the_lowering(setup):
    model, tx, state, batch, mesh = setup
    programs = train_programs(
        SDPointTrainee(model), tx, state, mesh, BATCH, SIZE, conv_lowering="matmul_grad"
    )
    programs.precompile(KEYS, workers=2)  # traced on compile threads
    for key in KEYS:
        expected, convs = _reference(model, key, state, batch, conv_matmul_grad)
        assert _equal(run_gradients(programs, key, state, batch, mesh), expected)
        assert _convolutions(programs.gradients[key]) == convs
        plain = _traced_step(model, key, state, batch)
        assert "custom_vjp_call" not in str(plain.jaxpr)  # nothing installed outside
        xla = _lowered_convolutions(_traced_step(model, key, state, batch, "xla"))
        matmul = _lowered_convolutions(_traced_step(model, key, state, batch, "matmul_grad"))
        assert xla == _lowered_convolutions(plain)
        # forward, input and kernel gradient of each large layer on the matrix products
        assert matmul < xla and (xla - matmul) % 3 == 0


def test_inference_and_calibration_programs_keep_xla_convolutions(setup):
    model, _, state, batch, _ = setup
    variables = state.variables
    eval_batch = {**batch, "mask": np.ones(BATCH, np.float32)}
    for key in KEYS:
        layers = len(record_calls(model, variables, batch["image"], key, nn.Conv, abstract=True))
        counts = _counts_fn(model).trace(variables, eval_batch, instance=key)
        moments_fn = _batch_moments_fn(model, variables["batch_stats"])
        moments = moments_fn.trace(variables["params"], batch["image"], instance=key)
        for traced in (counts, moments):
            assert "custom_vjp_call" not in str(traced.jaxpr)
            assert traced.lower().as_text().count("stablehlo.convolution") == layers
        # the contrast: the same model's train step traced with a training lowering
        # takes the matrix products (fewer convolutions) where XLA's convolutions stay
        matmul = _lowered_convolutions(_traced_step(model, key, state, batch, "matmul_grad"))
        assert matmul < _lowered_convolutions(_traced_step(model, key, state, batch, "xla"))


@pytest.fixture
def executable_cache_dir(tmp_path):
    """The persistent compilation cache (and so the executable cache) in ``tmp_path``
    for one test, the previous settings restored afterwards."""
    names = (
        "jax_compilation_cache_dir",
        "jax_enable_compilation_cache",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    enable_compilation_cache(tmp_path / "xla")
    compilation_cache.reset_cache()
    yield tmp_path / "xla-executables"
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_kept_executables_are_keyed_by_the_lowering(setup, executable_cache_dir):
    model, tx, state, batch, mesh = setup
    key = Instance.full()

    def run(lowering: str):
        programs = train_programs(
            SDPointTrainee(model),
            tx,
            state,
            mesh,
            BATCH,
            SIZE,
            "one fingerprint",
            conv_lowering=lowering,
        )
        programs.update[UPDATE_KEY]  # compiles (or loads) the update program too
        return run_gradients(programs, key, state, batch, mesh)

    xla = run("xla")
    assert len(list(executable_cache_dir.glob("*.executable"))) == 2  # gradients, update
    matmul = run("matmul_grad")
    # a new gradient program, the update program shared
    assert len(list(executable_cache_dir.glob("*.executable"))) == 3
    assert not _equal(matmul, xla)  # the lowerings round differently
    assert _equal(matmul, _reference(model, key, state, batch, conv_matmul_grad)[0])
    assert _equal(run("xla"), xla)  # loaded from its own file
    assert _equal(run("matmul_grad"), matmul)
    assert len(list(executable_cache_dir.glob("*.executable"))) == 3
