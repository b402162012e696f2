"""The XLA compiler options of inference and training programs: CPU only; inference's
change no output, training's lower level changes gradients only within float
tolerance."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import create
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import create_optimizer, initial_state
from sdpoint_jax.training.steps import gradient_step, train_programs
from sdpoint_jax.training.trainee import SDPointTrainee
from sdpoint_jax.xla_cpu.compiler_options import (
    INFERENCE_OPTION_SETS,
    XLA_DEFAULT_OPTIMIZATION_LEVEL,
    inference_compiler_options,
    train_compiler_options,
)
from sdpoint_jax.xla_cpu.conv_lowering import with_conv_lowering
from tests.conftest import init_variables, random_variables, run_gradients, tiny_config

LEVEL = "xla_backend_optimization_level"


def test_cpu_inference_options_change_no_output():
    assert inference_compiler_options("gpu") == {}
    assert inference_compiler_options("gpu", "xla-default") == {}
    assert inference_compiler_options("cpu", "xla-default") == {}
    options = inference_compiler_options("cpu")
    assert options, "CPU inference programs get their fusion options"
    assert set(INFERENCE_OPTION_SETS) == {"single-convolution", "xla-default"}
    with pytest.raises(ValueError, match=r"options 'fast'; choose from \['single-convolution'"):
        inference_compiler_options("cpu", "fast")
    model = create("wrn-10-4")
    variables = init_variables(model, (32, 32), batch=2)
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)

    def forward(compiler_options):
        fn = jax.jit(
            functools.partial(model.apply, instance=Instance.full(), train=False),
            compiler_options=compiler_options,
        )
        return fn(variables, images)

    np.testing.assert_allclose(forward(options), forward(None), rtol=1e-5, atol=1e-5)


def test_train_options_set_the_cpu_level_asked_for_unless_the_flags_go_lower(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert train_compiler_options(None, "cpu") == {}  # XLA's defaults
    assert train_compiler_options(1, "gpu") == train_compiler_options(1, "tpu") == {}
    assert train_compiler_options(1, "cpu") == {LEVEL: 1}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3 --a")
    assert train_compiler_options(2, "cpu") == {LEVEL: 2}
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_backend_optimization_level=2 --xla_backend_optimization_level=0"
    )
    assert train_compiler_options(1, "cpu") == {LEVEL: 0}  # the last one counts
    with pytest.raises(ValueError, match=r"cpu_optimization_level must lie in \[0, 3\], got 4"):
        train_compiler_options(4, "cpu")


def test_a_lower_train_level_computes_the_gradients_to_float_tolerance():
    """A CPU gradient program of ``train_programs`` asked for level 1 (0 under the test
    flags, which set 0) against the same step at XLA's default level: equal to float
    tolerance (not bit for bit)."""
    model = create("wrn-10-1")
    trainee = SDPointTrainee(model)
    tx = create_optimizer(tiny_config(1), steps_per_epoch=1000)
    shapes = jax.eval_shape(functools.partial(initial_state, trainee, tx, 32, 0))
    # no init to compile; host copies, since the gradient program donates its statistics
    variables = jax.tree.map(np.asarray, random_variables(model, seed=0, hw=(32, 32)))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 2).astype(np.int32),
    }
    key = Instance(2, 0.5)
    mesh = parallel.create_mesh()
    programs = train_programs(
        trainee, tx, shapes, mesh, 2, 32, conv_lowering="matmul_grad", cpu_optimization_level=1
    )
    state = shapes.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        step=np.zeros((), np.int32),
    )
    lowered = run_gradients(programs, key, state, batch, mesh)
    step = with_conv_lowering(
        functools.partial(gradient_step, trainee=trainee, setting=key), "matmul_grad"
    )
    options = {LEVEL: XLA_DEFAULT_OPTIMIZATION_LEVEL}
    stats = trainee.trained_statistics(state.batch_stats, key)
    default = jax.jit(step, compiler_options=options)(state.params, stats, batch, state.step)
    assert jax.tree.structure(lowered) == jax.tree.structure(default)
    expected = jax.tree.leaves(jax.device_get(default))
    for got, want in zip(jax.tree.leaves(lowered), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
