"""The patch-matrix convolution equals XLA's: values, differentiated outputs, gradients."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import create
from sdpoint_jax.xla_cpu.conv_lowering import (
    conv_matmul_grad,
    inference_compiler_options,
    patch_matmuls_pay,
    resolve_conv_lowering,
)
from tests.conftest import init_variables

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _ours(x, kernel, strides, padding):
    """The matrix-product kernel gradient for every size (no size rule)."""
    return conv_matmul_grad(
        x, kernel, strides, padding, dimension_numbers=NHWC, min_gradient_work=1
    )


@pytest.mark.parametrize(
    "hw, kernel, stride, padding",
    [
        ((8, 8), 3, 1, ((1, 1), (1, 1))),
        ((9, 7), 3, 2, ((1, 1), (1, 1))),  # odd sizes, strided: the ResNet downsampling conv
        ((8, 8), 1, 2, ((0, 0), (0, 0))),  # 1x1 strided shortcut
        ((11, 11), 7, 2, ((3, 3), (3, 3))),  # ImageNet stem
        ((6, 5), 3, 1, ((0, 2), (1, 0))),  # asymmetric padding
        ((7, 7), 3, 2, "SAME"),
    ],
)
def test_values_and_both_gradients_equal_xla(hw, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *hw, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)), jnp.float32)
    strides = (stride, stride)
    out = _reference(x, w, strides, padding)
    np.testing.assert_allclose(_ours(x, w, strides, padding), out, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=out.shape), jnp.float32)

    def output_and_grads(conv):  # the output of a differentiated call, its gradients
        y, vjp = jax.vjp(lambda a, b: conv(a, b, strides, padding), x, w)
        return (y, *vjp(cotangent))

    ours, ref = jax.jit(lambda: output_and_grads(_ours))(), output_and_grads(_reference)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_grouped_and_dilated_convolutions_fall_back_to_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    grouped = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    pads = ((1, 1), (1, 1))
    np.testing.assert_array_equal(
        conv_matmul_grad(x, grouped, (1, 1), pads, dimension_numbers=NHWC, feature_group_count=2),
        lax.conv_general_dilated(
            x, grouped, (1, 1), pads, dimension_numbers=NHWC, feature_group_count=2
        ),
    )
    dense = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
    np.testing.assert_array_equal(
        conv_matmul_grad(x, dense, (1, 1), pads, rhs_dilation=(2, 2), dimension_numbers=NHWC),
        lax.conv_general_dilated(
            x, dense, (1, 1), pads, rhs_dilation=(2, 2), dimension_numbers=NHWC
        ),
    )


@pytest.mark.parametrize(
    "shape, kernel_size, channels, matmul",
    [
        ((2, 16, 16, 32), 3, 32, False),  # 16*16 * 32 * 32: XLA
        ((2, 32, 32, 16), 3, 16, False),  # 32*32 * 16 * 16: XLA
        ((2, 32, 32, 16), 3, 32, True),  # 32*32 * 32 * 16: matrix product
        ((2, 8, 8, 256), 3, 256, True),  # 8*8 * 256 * min(256, 32): matrix product
        ((2, 8, 8, 4), 1, 4, True),  # 1x1: always the matrix product
    ],
)
def test_size_rule_keeps_small_convolutions_on_xla(shape, kernel_size, channels, matmul):
    x = jnp.ones(shape, jnp.float32)
    w = jnp.ones((kernel_size, kernel_size, shape[-1], channels), jnp.float32)

    def loss(w):
        return jnp.sum(conv_matmul_grad(x, w, (1, 1), "SAME", dimension_numbers=NHWC))

    hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    assert hlo.count(" convolution(") == (0 if matmul else 1)
    assert patch_matmuls_pay(shape, w.shape) == matmul


def _conv_shapes(model, variables, images, instance) -> list[tuple[tuple, tuple]]:
    """(input shape, HWIO kernel shape) of every convolution in one forward pass."""
    shapes = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv):
            kernel = (*module.kernel_size, args[0].shape[-1], module.features)
            shapes.append((args[0].shape, kernel))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, instance=instance, train=False)
    return shapes


@pytest.mark.parametrize("instance", [Instance.full(), Instance(2, 0.5)])
def test_model_loss_gradients_equal_across_lowerings(instance):
    """The switch changes neither parameters nor (within float tolerance) the training
    gradients of a whole network."""
    models = {name: create("wrn-10-4", conv_lowering=name) for name in ("xla", "matmul_grad")}
    variables = init_variables(models["xla"], (32, 32), batch=2)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)

    def loss_grads(model):
        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params},
                images,
                instance=instance,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(logits**2)

        compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
        return compiled(variables["params"]), compiled.as_text().count(" convolution(")

    (ours, our_convs), (ref, ref_convs) = (
        loss_grads(models["matmul_grad"]),
        loss_grads(models["xla"]),
    )
    # Three convolutions fewer (forward, input and kernel gradients) per layer large
    # enough for the matrix products.
    shapes = _conv_shapes(models["xla"], variables, images, instance)
    large = sum(patch_matmuls_pay(x, kernel) for x, kernel in shapes)
    assert 0 < large < len(shapes)
    assert our_convs == ref_convs - 3 * large
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_auto_resolves_by_backend_and_bad_names_are_rejected():
    assert resolve_conv_lowering("auto", "cpu") == "matmul_grad"
    assert resolve_conv_lowering("auto", "gpu") == "xla"
    assert resolve_conv_lowering("auto", "tpu") == "xla"
    assert resolve_conv_lowering("xla", "cpu") == "xla"
    with pytest.raises(ValueError, match=r"conv_lowering must be one of .*'im2col'"):
        resolve_conv_lowering("im2col")


def test_cpu_inference_options_change_no_output():
    assert inference_compiler_options("gpu") == {}
    options = inference_compiler_options("cpu")
    assert options, "CPU inference programs get their fusion options"
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
