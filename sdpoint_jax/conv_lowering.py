"""A CPU-friendly convolution: XLA's forward, a matrix-product kernel gradient.

On XLA:CPU the gradient of a convolution with respect to its *kernel* is lowered as a
convolution whose window is the whole feature map, which runs far off the fast path:
for a 3x3, 64 -> 64 convolution on 128 images of 32x32 it takes ~1.5 s, nine times
the forward pass. The same gradient written as one matrix product,
``patches(x)^T @ dy`` with the ``(N*Ho*Wo, kh*kw*C)`` patch matrix of the input, takes
~0.2 s. :func:`conv_matmul_kernel_grad` keeps XLA's forward pass and its input
gradient (both fast) and replaces only the kernel gradient; it is equal to
``lax.conv_general_dilated`` and its gradients within float tolerance.

Building the patch matrix costs memory traffic, which only pays where XLA's kernel
gradient is slow: forward + backward of one 3x3 convolution, batch 128, 2-core x86 CPU
(ms, XLA -> ours): 32x32x32: 366 -> 205; 32x32x64: 1832 -> 582; 16x16x64: 176 -> 143;
16x16x128: 422 -> 331; 8x8x256: 269 -> 252; but 32x32x16: 54 -> 76; 16x16x32:
37 -> 51; 8x8x128: 61 -> 87. So the matrix product is used for convolutions with at
least :data:`MIN_CHANNELS` input and output channels and at least
:data:`MIN_INPUT_ELEMENTS` input elements per image; smaller ones stay with XLA.

Selected per model with ``conv_lowering`` (see :data:`CONV_LOWERINGS`); ``"auto"``
picks ``"matmul_grad"`` on CPU and ``"xla"`` on GPU/TPU, whose convolution gradients
are already fast. The patch matrix costs ``kh*kw`` times the input's memory in the
backward pass, which is affordable in host memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

ConvLowering = Literal["xla", "matmul_grad"]
CONV_LOWERINGS: tuple[str, ...] = ("auto", "xla", "matmul_grad")
_NHWC = ("NHWC", "HWIO", "NHWC")
MIN_CHANNELS = 32
MIN_INPUT_ELEMENTS = 32 * 32 * 16


def resolve_conv_lowering(name: str, backend: str | None = None) -> ConvLowering:
    """Maps ``"auto"`` to ``"matmul_grad"`` on CPU and ``"xla"`` elsewhere."""
    if name not in CONV_LOWERINGS:
        raise ValueError(f"conv_lowering must be one of {CONV_LOWERINGS}, got {name!r}")
    if name != "auto":
        return name  # type: ignore[return-value]
    return "matmul_grad" if (backend or jax.default_backend()) == "cpu" else "xla"


def _patches(
    x: jax.Array,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``(N, H, W, C) -> (N, Ho, Wo, kh*kw*C)``: every window of the padded input.

    Channel index ``(i * kw + j) * C + c`` holds tap ``(i, j)`` of channel ``c``, the
    row-major order of an ``HWIO`` kernel's first three axes.
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    taps = [
        x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _make_conv(strides: tuple[int, int], pads: tuple[tuple[int, int], ...], precision: Any):
    def forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision
        )

    @jax.custom_vjp
    def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return forward(x, kernel)

    def conv_fwd(x: jax.Array, kernel: jax.Array):
        return forward(x, kernel), (x, kernel)

    def conv_bwd(residuals, dy: jax.Array):
        x, kernel = residuals
        kh, kw, cin, cout = kernel.shape
        input_transpose = jax.linear_transpose(lambda x_: forward(x_, kernel), x)
        (dx,) = input_transpose(dy)
        patches = _patches(x, (kh, kw), strides, pads).reshape(-1, kh * kw * cin)
        dkernel = jnp.dot(
            patches.T, dy.reshape(-1, cout), precision=precision, preferred_element_type=jnp.float32
        )
        return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


def conv_matmul_kernel_grad(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    min_channels: int = MIN_CHANNELS,
    min_input_elements: int = MIN_INPUT_ELEMENTS,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (same signature, as Flax calls it).

    Plain 2-D ``NHWC``/``HWIO`` convolutions (any stride and padding, no dilation, one
    group) that are large enough (see the module docstring) get the matrix-product
    kernel gradient; anything else is passed to ``lax.conv_general_dilated`` unchanged.
    ``min_channels`` and ``min_input_elements`` (input and output channels, and input
    elements per image) set "large enough".
    """
    use_matmul = (
        lhs.ndim == 4
        and min(rhs.shape[2:]) >= min_channels
        and lhs.shape[1] * lhs.shape[2] * lhs.shape[3] >= min_input_elements
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if not use_matmul:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _make_conv(strides, pads, precision)(lhs, rhs)


# XLA:CPU's YNNPACK library fusions, when allowed to absorb element-wise ops, fuse a
# whole pre-activation block (convs, batch norm, ReLU, the final pooling) into one
# fusion that runs slower than the separate ops at small batches: WRN-16-4 batch-1
# inference took 17.5 ms with the default fusion types and 11.0 ms with convolutions
# only (measured in one process under load; outputs identical). Training steps showed
# no gain, so only inference programs use it.
_CPU_INFERENCE_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
}


def inference_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA compiler options for inference programs (``jax.jit(...,
    compiler_options=...)``): library fusions limited to individual convolutions on
    CPU; none elsewhere."""
    return dict(_CPU_INFERENCE_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}
