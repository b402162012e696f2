"""Fresh variables of every kind of network a trainee starts from are Flax's ``init``'s,
bit for bit, though the network never runs (``fresh_variables``: ``lazy_init``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.compare.registry import build_method
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.training.trainee import fresh_variables
from tests.conftest import tiny_cifar10_config

IMAGE_SIZE = 16

# A method of each network family a trainee inits, and the call arguments it inits with:
# the SDPoint WRN, the WRN with dropout (regularised) and the early-exit WRN. MSDNet
# inits through the same helper and Flax initialisers; its eager init, the oracle, takes
# 8 s alone and 20 s in the full suite here.
FAMILIES = {
    "sdpoint": {"instance": Instance.full()},
    "dropout": {"instance": Instance.full()},
    "ee-ge": {},
}


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_fresh_variables_are_inits_bit_for_bit(method):
    model = build_method(method, tiny_cifar10_config()).model
    key = jax.random.key(3)
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    expected = model.init(key, images, train=False, **FAMILIES[method])
    fresh = fresh_variables(model, key, IMAGE_SIZE, **FAMILIES[method])
    assert set(fresh) == {"params", "batch_stats"}
    assert jax.tree.structure(fresh) == jax.tree.structure(dict(expected))
    for got, want in zip(jax.tree.leaves(fresh), jax.tree.leaves(dict(expected)), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
