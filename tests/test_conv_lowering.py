"""The matmul-kernel-gradient convolution equals XLA's convolution, values and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sdpoint_jax.conv_lowering import (
    conv_matmul_kernel_grad,
    inference_compiler_options,
    resolve_conv_lowering,
)
from sdpoint_jax.instance import Instance
from sdpoint_jax.models import create
from tests.conftest import init_variables

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _ours(x, kernel, strides, padding):
    """The matrix-product kernel gradient for every size (no size rule)."""
    return conv_matmul_kernel_grad(
        x, kernel, strides, padding, dimension_numbers=NHWC, min_channels=1, min_input_elements=1
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

    def grads(conv):
        return jax.vjp(lambda a, b: conv(a, b, strides, padding), x, w)[1](cotangent)

    for ours, ref in zip(jax.jit(lambda: grads(_ours))(), grads(_reference), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_grouped_and_dilated_convolutions_fall_back_to_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    grouped = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    pads = ((1, 1), (1, 1))
    np.testing.assert_array_equal(
        conv_matmul_kernel_grad(
            x, grouped, (1, 1), pads, dimension_numbers=NHWC, feature_group_count=2
        ),
        lax.conv_general_dilated(
            x, grouped, (1, 1), pads, dimension_numbers=NHWC, feature_group_count=2
        ),
    )
    dense = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
    np.testing.assert_array_equal(
        conv_matmul_kernel_grad(
            x, dense, (1, 1), pads, rhs_dilation=(2, 2), dimension_numbers=NHWC
        ),
        lax.conv_general_dilated(
            x, dense, (1, 1), pads, rhs_dilation=(2, 2), dimension_numbers=NHWC
        ),
    )


def test_size_rule_keeps_small_convolutions_on_xla():
    def kernel_grad_convolutions(shape, channels):
        x = jnp.ones(shape, jnp.float32)
        w = jnp.ones((3, 3, shape[-1], channels), jnp.float32)

        def loss(w):
            return jnp.sum(conv_matmul_kernel_grad(x, w, (1, 1), "SAME", dimension_numbers=NHWC))

        return jax.jit(jax.grad(loss)).lower(w).compile().as_text().count(" convolution(")

    assert kernel_grad_convolutions((2, 16, 16, 32), 32) == 1  # 8192 elements: XLA
    assert kernel_grad_convolutions((2, 32, 32, 16), 16) == 1  # 16 channels: XLA
    assert kernel_grad_convolutions((2, 32, 32, 32), 32) == 0  # large: matrix product


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
    # One convolution fewer per layer large enough for the matrix product: in the full
    # network, every layer but the 3-channel stem; a downsampled one has smaller maps.
    kernels = [leaf for leaf in jax.tree.leaves(variables["params"]) if leaf.ndim == 4]
    large = sum(kernel.shape[2] >= 32 for kernel in kernels)
    if instance == Instance.full():
        assert our_convs == ref_convs - large
    else:
        assert ref_convs - large < our_convs < ref_convs
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
