"""One XLA program per instance: the instance is static, and each compiles once."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import AdaptivePool
from tests.conftest import record_calls


def test_each_instance_compiles_once_and_pools_to_its_size(tiny_wrn):
    model, variables = tiny_wrn
    traces = []

    @functools.partial(jax.jit, static_argnames="instance")
    def forward(variables, x, instance):
        traces.append(instance)
        return model.apply(variables, x, instance=instance, train=False)

    x = jnp.ones((2, 16, 16, 3))
    instances = list(model.space)
    for _ in range(2):
        for instance in instances:
            assert forward(variables, x, instance=instance).shape == (2, 10)
    assert traces == instances  # traced (and compiled) once per distinct instance
    assert forward._cache_size() == len(instances)
    # equal instances share a program: Instance(0, 0.3) is the full network
    forward(variables, x, instance=Instance(0, 0.3))
    assert len(traces) == len(instances)

    map_size = {1: 16, 2: 8, 3: 4}  # wrn-10-1 on 16x16: one block per stage
    for instance in instances[1:]:
        ((in_shape, out_shape),) = record_calls(
            model, variables, x, instance, AdaptivePool, abstract=True
        )
        side = map_size[instance.point]
        expected = round(instance.ratio * side)
        assert in_shape == (2, side, side, in_shape[3])
        assert out_shape == (2, expected, expected, in_shape[3])
