"""The patch-matrix convolution equals XLA's: values, differentiated outputs, gradients."""

from __future__ import annotations

import concurrent.futures
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sdpoint_jax.core.convolution import conv_general_dilated, conv_implementation
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import create
from sdpoint_jax.xla_cpu.conv_lowering import (
    conv_matmul_grad,
    patch_matmuls_pay,
    patches_by_gather,
    patches_by_slices,
    resolve_conv_lowering,
    with_conv_lowering,
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
    model = create("wrn-10-4")
    variables = init_variables(model, (32, 32), batch=2)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)

    def loss_grads(lowering):
        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params},
                images,
                instance=instance,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(logits**2)

        grad_fn = jax.jit(with_conv_lowering(jax.grad(loss), lowering))
        compiled = grad_fn.lower(variables["params"]).compile()
        return compiled(variables["params"]), compiled.as_text().count(" convolution(")

    (ours, our_convs), (ref, ref_convs) = loss_grads("matmul_grad"), loss_grads("xla")
    # Three convolutions fewer (forward, input and kernel gradients) per layer large
    # enough for the matrix products.
    shapes = _conv_shapes(model, variables, images, instance)
    large = sum(patch_matmuls_pay(x, kernel) for x, kernel in shapes)
    assert 0 < large < len(shapes)
    assert our_convs == ref_convs - 3 * large
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _matmul_traced(fn, *args) -> bool:
    """Whether tracing ``fn(*args)`` differentiates a convolution through the patch
    matrix (its jaxpr holds the custom-gradient call)."""
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def _layer_conv(x, w, *, stride=1):
    """A layer's convolution (the entry point every layer calls)."""
    return conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=NHWC)


def test_with_conv_lowering_lowers_the_convolutions_fn_traces():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((1, 1, 4, 4))  # 1x1: always the matrix product
    assert not _matmul_traced(_layer_conv, x, w)
    assert _matmul_traced(with_conv_lowering(_layer_conv, "matmul_grad"), x, w)
    assert not _matmul_traced(with_conv_lowering(_layer_conv, "xla"), x, w)
    assert _matmul_traced(with_conv_lowering(_layer_conv, "auto"), x, w) == (
        jax.default_backend() == "cpu"
    )
    assert not _matmul_traced(_layer_conv, x, w)  # nothing left installed
    with conv_implementation(conv_matmul_grad):  # the innermost choice wins
        assert not _matmul_traced(with_conv_lowering(_layer_conv, "xla"), x, w)
    lowered = with_conv_lowering(_layer_conv, "matmul_grad")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # traced on another thread
        assert pool.submit(_matmul_traced, lowered, x, w).result()
        with conv_implementation(conv_matmul_grad):  # a block does not reach the thread
            assert not pool.submit(_matmul_traced, _layer_conv, x, w).result()


def test_with_conv_lowering_keeps_name_and_signature_and_rejects_bad_names():
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((1, 1, 4, 4))
    lowered = with_conv_lowering(functools.partial(_layer_conv, stride=2), "matmul_grad")
    assert lowered.__name__ == "_layer_conv"
    assert jax.jit(lowered).lower(x, w).as_text().startswith("module @jit__layer_conv")
    static = jax.jit(with_conv_lowering(_layer_conv, "xla"), static_argnames="stride")
    assert static(x, w, stride=2).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"conv_lowering must be one of .*'im2col'"):
        with_conv_lowering(_layer_conv, "im2col")


def test_auto_resolves_by_backend_and_bad_names_are_rejected():
    assert resolve_conv_lowering("auto", "cpu") == "matmul_grad"
    assert resolve_conv_lowering("auto", "gpu") == "xla"
    assert resolve_conv_lowering("auto", "tpu") == "xla"
    assert resolve_conv_lowering("xla", "cpu") == "xla"
    with pytest.raises(ValueError, match=r"conv_lowering must be one of .*'im2col'"):
        resolve_conv_lowering("im2col")


@pytest.mark.parametrize(
    "shape, kernel_hw, strides, pads",
    [
        ((2, 8, 8, 5), (3, 3), (1, 1), ((1, 1), (1, 1))),
        ((2, 9, 7, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
        ((1, 11, 11, 2), (7, 7), (2, 2), ((3, 3), (3, 3))),
        ((2, 6, 5, 4), (3, 3), (1, 1), ((0, 2), (1, 0))),
        ((2, 8, 8, 4), (1, 1), (2, 2), ((0, 0), (0, 0))),
        ((1, 7, 9, 2), (2, 3), (1, 2), ((0, 1), (1, 1))),
    ],
)
def test_patches_by_gather_equal_patches_by_slices(shape, kernel_hw, strides, pads):
    """The gather the forward pass builds the patch matrix with equals, element for
    element, the slices whose transpose gives the input gradient, and an independent
    oracle: each window read off the padded input."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    gathered = jax.jit(patches_by_gather, static_argnums=(1, 2, 3))(x, kernel_hw, strides, pads)
    sliced = jax.jit(patches_by_slices, static_argnums=(1, 2, 3))(x, kernel_hw, strides, pads)
    padded = np.pad(np.asarray(x), ((0, 0), *pads, (0, 0)))
    (kh, kw), (sh, sw) = kernel_hw, strides
    out_h, out_w = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    oracle = np.stack(
        [
            np.stack(
                [
                    padded[:, h * sh : h * sh + kh, w * sw : w * sw + kw, :].reshape(shape[0], -1)
                    for w in range(out_w)
                ],
                axis=1,
            )
            for h in range(out_h)
        ],
        axis=1,
    )
    np.testing.assert_array_equal(gathered, oracle)
    np.testing.assert_array_equal(sliced, oracle)


def test_differentiated_convolution_builds_its_patch_matrix_with_one_gather():
    """What makes the gradient program quick to compile: the patch matrix is one gather
    of the materialised padded input, not a kernel per tap plus a concatenation, while
    the input gradient still sums shifted slices (no scatter)."""
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 32))
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(_ours(x, w, (1, 1), "SAME") ** 2), (0, 1)))
    ops = re.findall(r"\} ([a-z-]+)\(", grads.lower(x, w).compile().as_text())
    assert ops.count("gather") == 1
    assert "concatenate" not in ops
    assert "scatter" not in ops
