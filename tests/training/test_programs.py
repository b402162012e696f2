"""Compiled programs kept across runs: a second set of programs loads them without
tracing, computes the same, still donates; any change of fingerprint misses; a
damaged file is compiled again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from sdpoint_jax.training.programs import (
    ExecutableCache,
    InstancePrograms,
    default_compile_workers,
    enable_compilation_cache,
    executable_cache,
    host_description,
)

EXAMPLE = (jax.ShapeDtypeStruct((3, 4), jnp.float32),)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def persistent_cache_off():
    """JAX's persistent compilation cache off for one test (other tests may have turned
    it on in this process): every program is then compiled, and kept by the executable
    cache."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def programs(cache: ExecutableCache, traced: list) -> InstancePrograms:
    def build(key: float):
        def scaled(x):
            traced.append(key)
            return jnp.sin(x) * key

        return jax.jit(scaled, donate_argnums=0)

    return InstancePrograms(build, EXAMPLE, "test", cache)


@pytest.mark.usefixtures("persistent_cache_off")
def test_second_run_loads_programs_without_tracing(tmp_path):
    traced: list = []
    first = programs(ExecutableCache(tmp_path, "fingerprint"), traced)
    first.precompile([2.0, 3.0], workers=2)
    assert sorted(traced) == [2.0, 3.0]
    assert len(list(tmp_path.glob("*.executable"))) == 2

    second = programs(ExecutableCache(tmp_path, "fingerprint"), traced)
    second.precompile([2.0, 3.0], workers=2)
    assert sorted(traced) == [2.0, 3.0]  # nothing traced again
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for key in (2.0, 3.0):
        np.testing.assert_array_equal(
            np.asarray(second[key](jnp.asarray(x))), np.asarray(first[key](jnp.asarray(x)))
        )
    donated = jnp.asarray(x)
    second[2.0](donated)
    assert donated.is_deleted()


def test_another_fingerprint_or_shape_is_another_program(tmp_path):
    cache = ExecutableCache(tmp_path, "a")
    assert cache.path(2.0, EXAMPLE) != ExecutableCache(tmp_path, "b").path(2.0, EXAMPLE)
    assert cache.path(2.0, EXAMPLE) != cache.path(3.0, EXAMPLE)
    other = (jax.ShapeDtypeStruct((3, 5), jnp.float32),)
    assert cache.path(2.0, EXAMPLE) != cache.path(2.0, other)
    assert cache.path(2.0, EXAMPLE) == ExecutableCache(tmp_path, "a").path(2.0, EXAMPLE)


def test_programs_compiled_with_other_xla_flags_are_other_programs(tmp_path, monkeypatch):
    cache = ExecutableCache(tmp_path, "a")
    assert os.environ["XLA_FLAGS"] in host_description()  # as the backend started
    path = cache.path(2.0, EXAMPLE)
    host_description.cache_clear()
    try:
        monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
        assert cache.path(2.0, EXAMPLE) != path
    finally:
        host_description.cache_clear()
        monkeypatch.undo()
    assert cache.path(2.0, EXAMPLE) == path


@pytest.mark.usefixtures("persistent_cache_off")
def test_damaged_file_is_compiled_again_and_replaced(tmp_path, capsys):
    traced: list = []
    cache = ExecutableCache(tmp_path, "fingerprint")
    programs(cache, traced)[2.0]
    path = cache.path(2.0, EXAMPLE)
    path.write_bytes(path.read_bytes()[:100])
    again = programs(cache, traced)
    x = jnp.ones((3, 4))
    np.testing.assert_allclose(np.asarray(again[2.0](x)), np.sin(1.0) * 2.0, rtol=1e-6)
    assert traced == [2.0, 2.0]
    assert "ignoring unreadable cached executable" in capsys.readouterr().out
    assert cache.load(path) is not None  # replaced by a good one
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 2), (6, 6), (16, 8), (64, 8)])
def test_default_compile_workers_is_one_per_usable_cpu_at_most_8(monkeypatch, cpus, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cpus)))
    assert default_compile_workers() == workers


def test_executables_live_beside_the_compilation_cache(tmp_path):
    enable_compilation_cache(tmp_path / "xla")
    cache = executable_cache("fingerprint")
    assert cache is not None and cache.directory == tmp_path / "xla-executables"
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        assert executable_cache("fingerprint") is None
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


PROGRAM_RUN = """
import sys
import jax, jax.numpy as jnp, numpy as np
from sdpoint_jax.training.programs import (
    InstancePrograms, enable_compilation_cache, executable_cache,
)

enable_compilation_cache(sys.argv[1])
def build(key):
    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.transpose(y, (0, 3, 1, 2)).sum() * key + jax.nn.relu(y).mean()
    return jax.jit(jax.grad(loss, argnums=1))
args = (
    jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32),
    jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32),
)
programs = InstancePrograms(build, args, "test", executable_cache(sys.argv[2]))
grad = programs[2.0](jnp.ones((8, 16, 16, 3)), jnp.ones((3, 3, 3, 8)))
print(float(np.asarray(grad).sum()))
"""


def test_program_from_the_compilation_cache_is_not_kept_as_an_executable(tmp_path):
    # XLA:CPU serialises an executable that JAX's cache loaded without its machine code:
    # keeping it would make every later run fail with "Function ... not found".
    def run(fingerprint: str) -> str:
        command = [sys.executable, "-c", PROGRAM_RUN, str(tmp_path / "xla"), fingerprint]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    executables = tmp_path / "xla-executables"
    expected = run("first")  # compiled: kept by both caches
    assert len(list(executables.glob("*.executable"))) == 1
    assert run("second") == expected  # JAX's cache hit: not kept
    assert len(list(executables.glob("*.executable"))) == 1
    assert run("second") == expected
    assert run("first") == expected  # loaded from the executable cache
