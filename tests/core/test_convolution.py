"""The layers' convolution entry point: XLA's convolution unless an implementation is
installed, which holds in its block and thread only."""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sdpoint_jax.core.convolution import conv_general_dilated, conv_implementation

NHWC = ("NHWC", "HWIO", "NHWC")
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
W = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4)), jnp.float32)


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def _doubled(lhs, rhs, window_strides, padding, **kwargs):
    return 2.0 * lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def test_default_is_xla_convolution():
    expected = lax.conv_general_dilated(X, W, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    np.testing.assert_array_equal(_conv(X, W), expected)
    np.testing.assert_array_equal(jax.jit(_conv)(X, W), expected)


def test_installed_implementation_holds_in_its_block_and_is_restored():
    plain = np.asarray(_conv(X, W))
    with conv_implementation(_doubled):
        np.testing.assert_array_equal(_conv(X, W), 2.0 * plain)
        with conv_implementation(lax.conv_general_dilated):
            np.testing.assert_array_equal(_conv(X, W), plain)
        np.testing.assert_array_equal(_conv(X, W), 2.0 * plain)
    np.testing.assert_array_equal(_conv(X, W), plain)
    with pytest.raises(RuntimeError, match="inside"), conv_implementation(_doubled):
        raise RuntimeError("inside")
    np.testing.assert_array_equal(_conv(X, W), plain)


def test_installed_implementation_does_not_reach_other_threads():
    plain = np.asarray(_conv(X, W))
    with conv_implementation(_doubled), concurrent.futures.ThreadPoolExecutor(1) as pool:
        np.testing.assert_array_equal(pool.submit(_conv, X, W).result(), plain)


def test_implementation_must_be_callable():
    with pytest.raises(TypeError, match="must be callable, got 'xla'"), conv_implementation("xla"):
        pass
