"""Multiscale training (MS baseline): drawn sizes, on-device resizing, per-size BN
statistics, inference settings and costs."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.compare.multiscale import MultiscaleMethod, stats_key
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models.cost import count_flops

IMAGE_SIZE = 16
BATCH = 4


@pytest.fixture(scope="module")
def small():
    """WRN-10-1 trained at sizes 8..16 on 16x16 images."""
    method = MultiscaleMethod("wrn-10-1", num_classes=10, min_size=8, max_size=16)
    variables = method.init_variables(jax.random.key(0), IMAGE_SIZE)
    images = jax.random.normal(jax.random.key(1), (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3))
    batch = {"image": images, "label": jnp.arange(BATCH, dtype=jnp.int32)}
    return method, variables, batch


def _leaves_equal(a, b) -> list[bool]:
    """Per leaf of two trees of the same structure: are the arrays equal?"""
    return jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_train_size_is_pure_function_of_seed_and_step_and_covers_range():
    method = MultiscaleMethod("wrn-16-1")
    draws = [method.train_setting(0, step) for step in range(500)]
    assert draws == [method.train_setting(0, step) for step in range(500)]
    assert all(type(s) is int for s in draws)
    assert set(draws) == set(range(16, 33))  # every size of 16..32, nothing outside
    assert draws != [method.train_setting(1, step) for step in range(500)]


@pytest.mark.parametrize("step", [0, 1, 2])
def test_loss_feeds_the_network_the_batch_resized_to_the_drawn_size(small, step):
    method, variables, batch = small
    size = method.train_setting(3, step)
    stem_inputs = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.module.name == "stem":
            stem_inputs.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        method.loss(variables["params"], variables, batch, size, jax.random.key(0))
    (seen,) = stem_inputs
    assert seen.shape == (BATCH, size, size, 3)
    if size == IMAGE_SIZE:
        np.testing.assert_array_equal(seen, batch["image"])
    else:
        expected = jax.image.resize(
            batch["image"], (BATCH, size, size, 3), method="bilinear", antialias=False
        )
        np.testing.assert_allclose(seen, expected, rtol=1e-6, atol=1e-6)


def test_init_creates_one_statistics_tree_per_training_size(small):
    _, variables, _ = small
    stats = variables["batch_stats"]
    assert set(stats) == {stats_key(s) for s in range(8, 17)}
    trees = list(stats.values())
    assert all(jax.tree.structure(t) == jax.tree.structure(trees[0]) for t in trees)
    # the plain model's statistics: one "uniform" key per BN layer
    assert {path[-2].key for path, _ in jax.tree.leaves_with_path(trees[0])} == {"uniform"}


def test_training_step_updates_only_its_size_statistics(small):
    method, variables, batch = small
    size = 11
    loss_fn = jax.jit(method.loss, static_argnums=3)
    loss, (updated, logits) = loss_fn(
        variables["params"], variables, batch, size, jax.random.key(0)
    )
    assert np.isfinite(float(loss))
    assert logits.shape == (BATCH, 10)
    new, old = updated["batch_stats"], variables["batch_stats"]
    assert set(new) == set(old)
    for key in old:
        assert jax.tree.structure(new[key]) == jax.tree.structure(old[key])
        if key == stats_key(size):
            assert not any(_leaves_equal(new[key], old[key])), "every statistic must move"
        else:
            assert all(_leaves_equal(new[key], old[key])), key


def test_logits_at_each_size_use_that_size_statistics(small):
    method, variables, batch = small
    images = batch["image"]
    for size in method.eval_settings():
        assert method.logits(variables, images, size).shape == (BATCH, 10)
    shifted = jax.tree.map(lambda x: x, variables)
    shifted["batch_stats"] = {
        **variables["batch_stats"],
        "s10": jax.tree.map(lambda x: x + 1.0, variables["batch_stats"]["s10"]),
    }
    assert not np.allclose(method.logits(shifted, images, 10), method.logits(variables, images, 10))
    np.testing.assert_array_equal(
        method.logits(shifted, images, 12), method.logits(variables, images, 12)
    )


def test_gflops_grow_with_size_and_count_the_network_at_that_size():
    method = MultiscaleMethod("wrn-16-1")
    costs = [method.gflops(s, 32) for s in method.eval_settings()]
    assert all(a < b for a, b in itertools.pairwise(costs))
    assert method.gflops(20, 32) == count_flops(method.model, Instance.full(), (20, 20)) / 1e9
    assert method.gflops(20, 32) == method.gflops(20, 64)  # the resize is not counted


def test_eval_sizes_default_custom_and_invalid():
    method = MultiscaleMethod("wrn-16-1")
    assert tuple(method.eval_settings()) == tuple(range(16, 33, 2))
    assert method.describe(16) == "16px"
    odd = MultiscaleMethod("wrn-16-1", min_size=16, max_size=31)
    assert tuple(odd.eval_settings()) == (16, 18, 20, 22, 24, 26, 28, 30, 31)
    assert tuple(MultiscaleMethod("wrn-16-1", eval_sizes=(32, 16)).eval_settings()) == (16, 32)
    with pytest.raises(ValueError, match="eval_sizes"):
        MultiscaleMethod("wrn-16-1", eval_sizes=(16, 40))
    with pytest.raises(ValueError, match="min_size"):
        MultiscaleMethod("wrn-16-1", min_size=20, max_size=16)
    with pytest.raises(ValueError, match="33"):
        method.gflops(33, 32)
