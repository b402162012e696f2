"""Adaptive pooling against PyTorch golden outputs, plus bins, jit, gradients, errors.

The golden file ``tests/data/adaptive_pool_golden.npz`` is written by
``tests/tools/make_pooling_fixture.py`` (PyTorch's ``F.adaptive_avg_pool2d`` and
``F.adaptive_max_pool2d``); these tests read it with numpy only.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.core.instance import downsampled_size
from sdpoint_jax.core.pooling import (
    adaptive_avg_pool,
    adaptive_bins,
    adaptive_max_pool,
    bin_element_count,
    downsampled_hw,
)

GOLDEN_PATH = pathlib.Path(__file__).parents[1] / "data" / "adaptive_pool_golden.npz"
ATOL = 1e-6


def _load_golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN_PATH) as data:
        return {key: data[key] for key in data.files}


GOLDEN = _load_golden()
CASE_NAMES = [str(name) for name in GOLDEN["case_names"]]
# Cases whose output size is (round(r * H), round(r * W)) for a stored ratio r.
RATIO_CASES = [name for name in CASE_NAMES if not math.isnan(float(GOLDEN[f"ratio_{name}"]))]


def _case(name: str) -> tuple[np.ndarray, tuple[int, int], np.ndarray, np.ndarray, float]:
    x = GOLDEN[str(GOLDEN[f"input_{name}"])]
    out_hw = tuple(int(v) for v in GOLDEN[f"out_hw_{name}"])
    return x, out_hw, GOLDEN[f"avg_{name}"], GOLDEN[f"max_{name}"], float(GOLDEN[f"ratio_{name}"])


def test_golden_file_has_all_cases() -> None:
    expected = {
        "32x32_to_24x24",
        "16x16_to_12x12",
        "8x8_to_6x6",
        "7x7_to_4x4",
        "14x14_to_10x10",
        "56x56_to_42x42",
        "5x5_to_3x3",
        "7x10_to_4x6",
        "9x6_to_5x4",
        "112x112_to_28x28",
        "112x112_to_42x42",
    }
    assert expected <= set(CASE_NAMES)
    assert len(RATIO_CASES) >= 9
    assert GOLDEN_PATH.stat().st_size < 1_000_000


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_pytorch(name: str) -> None:
    x, out_hw, want_avg, want_max, _ = _case(name)
    assert x.dtype == np.float32 and x.ndim == 4
    assert want_avg.shape == want_max.shape == (x.shape[0], *out_hw, x.shape[3])

    got_avg = np.asarray(adaptive_avg_pool(jnp.asarray(x), out_hw))
    got_max = np.asarray(adaptive_max_pool(jnp.asarray(x), out_hw))

    assert got_avg.shape == want_avg.shape
    assert got_max.shape == want_max.shape
    np.testing.assert_allclose(got_avg, want_avg, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got_max, want_max, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_pytorch_under_jit(name: str) -> None:
    x, out_hw, want_avg, want_max, _ = _case(name)
    avg = jax.jit(adaptive_avg_pool, static_argnames="out_hw")
    mx = jax.jit(adaptive_max_pool, static_argnames="out_hw")
    np.testing.assert_allclose(np.asarray(avg(x, out_hw=out_hw)), want_avg, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(mx(x, out_hw=out_hw)), want_max, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", RATIO_CASES)
def test_downsampled_hw_matches_python_round(name: str) -> None:
    x, out_hw, _, _, ratio = _case(name)
    in_hw = (x.shape[1], x.shape[2])
    assert downsampled_hw(in_hw, ratio) == out_hw
    assert (downsampled_size(in_hw[0], ratio), downsampled_size(in_hw[1], ratio)) == out_hw


def test_downsampled_size_matches_round_table() -> None:
    table = GOLDEN["round_table"]
    assert len(table) > 0
    for size, ratio, want in table:
        assert downsampled_size(int(size), float(ratio)) == int(want), (size, ratio)
    # Half-way products round to even, as Python's round does.
    assert downsampled_size(14, 0.75) == 10
    assert downsampled_size(7, 0.5) == 4
    assert downsampled_size(5, 0.5) == 2


def _bins_by_formula(in_size: int, out_size: int) -> tuple[tuple[int, int], ...]:
    return tuple(
        (math.floor(i * in_size / out_size), math.ceil((i + 1) * in_size / out_size))
        for i in range(out_size)
    )


def test_adaptive_bins_formula_sweep() -> None:
    for in_size in range(1, 65):
        for out_size in range(1, 65):
            bins = adaptive_bins(in_size, out_size)
            assert bins == _bins_by_formula(in_size, out_size), (in_size, out_size)
            assert bins[0][0] == 0 and bins[-1][1] == in_size
            assert all(end > start for start, end in bins)
            for (start, end), (next_start, _) in itertools.pairwise(bins):
                # Consecutive bins leave no gap (they may overlap by one element).
                assert start <= next_start <= end
            assert bin_element_count(in_size, out_size) == sum(e - s for s, e in bins)


def test_adaptive_bins_imagenet_sizes() -> None:
    for in_size in (112, 56, 28, 14, 7):
        for out_size in {downsampled_size(in_size, r) for r in (0.25, 0.375, 0.5, 0.75)}:
            assert adaptive_bins(in_size, out_size) == _bins_by_formula(in_size, out_size)
    # Exact divisions give disjoint equal bins.
    assert adaptive_bins(8, 4) == ((0, 2), (2, 4), (4, 6), (6, 8))
    assert adaptive_bins(7, 4) == ((0, 2), (1, 4), (3, 6), (5, 7))
    assert bin_element_count(8, 4) == 8
    assert bin_element_count(7, 4) == 10


@pytest.mark.parametrize("in_size", [0, -3])
def test_adaptive_bins_rejects_bad_input_size(in_size: int) -> None:
    with pytest.raises(ValueError, match=rf"input {in_size} -> output 4"):
        adaptive_bins(in_size, 4)


def test_adaptive_bins_rejects_bad_output_size() -> None:
    with pytest.raises(ValueError, match=r"input 4 -> output 0"):
        adaptive_bins(4, 0)


def _avg_pool_grad_numpy(in_hw: tuple[int, int], weights: np.ndarray) -> np.ndarray:
    """d/dx sum(avg_pool(x) * weights), bin by bin: each output spreads its weight
    uniformly over the input elements of its bin."""
    n, out_h, out_w, c = weights.shape
    grad = np.zeros((n, *in_hw, c), np.float64)
    for i, (h0, h1) in enumerate(_bins_by_formula(in_hw[0], out_h)):
        for j, (w0, w1) in enumerate(_bins_by_formula(in_hw[1], out_w)):
            area = (h1 - h0) * (w1 - w0)
            grad[:, h0:h1, w0:w1, :] += weights[:, i : i + 1, j : j + 1, :] / area
    return grad


@pytest.mark.parametrize(("in_hw", "out_hw"), [((7, 10), (4, 6)), ((5, 5), (3, 3))])
def test_avg_pool_gradient_is_transpose(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *in_hw, 3)).astype(np.float32)
    w = rng.standard_normal((2, *out_hw, 3)).astype(np.float32)

    def loss(x: jax.Array) -> jax.Array:
        return jnp.sum(adaptive_avg_pool(x, out_hw) * w)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    np.testing.assert_allclose(grad, _avg_pool_grad_numpy(in_hw, w), rtol=0, atol=1e-6)


def test_max_pool_gradient_routes_to_argmax() -> None:
    # Distinct values: the gradient of sum(max_pool(x)) counts, per input element, the
    # bins whose maximum it is.
    in_hw, out_hw = (7, 7), (4, 4)
    x = np.random.default_rng(1).permutation(49).reshape(1, *in_hw, 1).astype(np.float32)
    grad = np.asarray(jax.grad(lambda v: jnp.sum(adaptive_max_pool(v, out_hw)))(x))
    want = np.zeros_like(x)
    for h0, h1 in adaptive_bins(7, 4):
        for w0, w1 in adaptive_bins(7, 4):
            block = x[0, h0:h1, w0:w1, 0]
            r, c = np.unravel_index(np.argmax(block), block.shape)
            want[0, h0 + r, w0 + c, 0] += 1.0
    np.testing.assert_array_equal(grad, want)


@pytest.mark.parametrize("pool", [adaptive_avg_pool, adaptive_max_pool])
@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (6, 9)])
def test_identity_when_sizes_equal(pool, hw: tuple[int, int]) -> None:
    x = np.random.default_rng(2).standard_normal((2, *hw, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pool(jnp.asarray(x), hw)), x)
    np.testing.assert_array_equal(np.asarray(jax.jit(pool, static_argnums=1)(x, hw)), x)


def test_global_pooling() -> None:
    x = np.random.default_rng(3).standard_normal((2, 5, 6, 3)).astype(np.float32)
    avg = np.asarray(adaptive_avg_pool(jnp.asarray(x), (1, 1)))
    mx = np.asarray(adaptive_max_pool(jnp.asarray(x), (1, 1)))
    np.testing.assert_allclose(avg, x.mean(axis=(1, 2), keepdims=True), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(mx, x.max(axis=(1, 2), keepdims=True))


@pytest.mark.parametrize("pool", [adaptive_avg_pool, adaptive_max_pool])
def test_preserves_dtype(pool) -> None:
    x = jnp.ones((1, 7, 7, 2), jnp.bfloat16)
    out = pool(x, (4, 4))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.ones((1, 4, 4, 2)))


@pytest.mark.parametrize("pool", [adaptive_avg_pool, adaptive_max_pool])
@pytest.mark.parametrize("shape", [(7, 7), (7, 7, 3), (1, 2, 7, 7, 3)])
def test_rejects_non_4d_input(pool, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"NHWC.*{re.escape(str(shape))}"):
        pool(jnp.zeros(shape), (4, 4))


@pytest.mark.parametrize("pool", [adaptive_avg_pool, adaptive_max_pool])
@pytest.mark.parametrize(
    ("out_hw", "axis"), [((0, 4), "height"), ((4, 0), "width"), ((-1, 4), "height")]
)
def test_rejects_bad_output_size(pool, out_hw: tuple[int, int], axis: str) -> None:
    with pytest.raises(ValueError, match=rf"{axis} must be >= 1, got {re.escape(str(out_hw))}"):
        pool(jnp.zeros((1, 7, 7, 3)), out_hw)
