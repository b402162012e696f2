"""Shared test helpers: tiny models and traced records of what a forward pass did."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sdpoint_jax.instance import Instance
from sdpoint_jax.models import SDPointModel, create


def init_variables(model: SDPointModel, hw: tuple[int, int], batch: int = 2):
    x = jnp.zeros((batch, *hw, 3), jnp.float32)
    return model.init(jax.random.key(0), x, instance=Instance.full(), train=False)


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
