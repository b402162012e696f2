"""Shared test helpers: tiny models, traced records of what a forward pass did, and a
tiny config on the real CIFAR-10 beside the project."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from sdpoint_jax.config import cifar_config, get_field, set_field
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import SDPointModel, create

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
