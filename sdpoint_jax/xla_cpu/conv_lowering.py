"""A CPU-friendly convolution for training: matrix products over one patch matrix.

On XLA:CPU the gradient of a convolution with respect to its *kernel* is lowered as a
convolution whose window is the whole feature map, which runs far off the fast path,
many times slower than the forward pass for 3x3 convolutions with 64 channels at
32x32. The same gradient written as one matrix product, ``patches(x)^T @ dy`` with the
``(N*Ho*Wo, kh*kw*C)`` patch matrix of the input, is several times faster. Once that
matrix is built, the forward pass and the input gradient are matrix products too:
``y = patches @ W`` (XLA:CPU's matrix products reach a higher FLOP rate than its
convolutions with 64 channels at 32x32), and ``dx`` is the transpose of building the
patches applied to ``dy @ W^T`` (nine shifted adds). So :func:`conv_matmul_grad`
builds the patch matrix once in the forward pass of a differentiated call, keeps it
for the backward pass (``kh*kw`` times the input's memory per convolution, affordable
in host memory), and computes the output and both gradients from it. Outside
differentiation (inference) it is XLA's convolution. Values and gradients equal
``lax.conv_general_dilated``'s within float tolerance.

A WRN-16-4 train step is faster with all three from the patch matrix than with only
the kernel gradient from it.

The patch matrix is built by one gather (:func:`patches_by_gather`), and the input
gradient transposes the same matrix written as strided slices
(:func:`patches_by_slices`): the slices' transpose is fast at run time, their forward
form slow to compile (a kernel per tap, plus the concatenation). The two are equal
element for element, so this changes no value: the gradients are bit-identical to
building both from slices, and the WRN-28-10 gradient program compiles about 1.7x
faster (``benchmarks/README.md``, "Compilation").

The kept patch matrices cost host memory: train-step temporaries are several times
those of ``"xla"``; pick ``"xla"`` where memory is short.

Building the patch matrix costs memory traffic, which only pays where XLA's kernel
gradient is slow: large maps with many channels, and every 1x1 kernel, whose patch
matrix is the input itself (or its strided slice); small 3x3 convolutions (few
channels, or small maps) are faster with XLA. The timings per shape, the train step
and the memory are in ``benchmarks/README.md`` ("Convolution lowering per shape").

XLA's time grows with the input's height x width x output channels, and with the
input channels up to about 32, so the matrix product is used for every 1x1
convolution and where ``height * width * out_channels * min(in_channels, 32)`` is at
least :data:`MIN_GRADIENT_WORK` (that of 32x32, 16->32); smaller ones stay with XLA.

The lowering is a compile-time policy of a program, set where the program is built:
:func:`with_conv_lowering` wraps the function given to ``jax.jit`` so that, while it
is traced, every layer's convolution
(:func:`sdpoint_jax.core.convolution.conv_general_dilated`) runs the chosen
implementation. Training programs take theirs from the run's ``conv_lowering``
(:data:`CONV_LOWERINGS`; ``"auto"`` picks ``"matmul_grad"`` on CPU and ``"xla"`` on
GPU/TPU, whose convolution gradients are already fast); inference, evaluation and
calibration programs differentiate nothing and set none, so they run XLA's
convolutions (the patch matrices would only matter for gradients). Models carry no
lowering, and the same model builds both kinds of program. Since the lowering is not
in the model, a cache of compiled programs must key on it
(:func:`sdpoint_jax.training.steps.train_programs` does).

Why a context variable read at trace time, installed inside the traced function:
the choice then reaches every convolution of any architecture (also the low-mode
convolutions, whose hook pools the kernel first) without a field on models,
contexts or layers, and the traced program is exactly the one that a lowering field
gave (same operations, only source locations in the metadata differ). Installing it
inside the function, not around the call that compiles it, makes it hold on the
compile threads of :meth:`sdpoint_jax.training.programs.InstancePrograms.precompile`
(context variables do not cross threads). Flax's ``nn.intercept_methods`` could swap
``nn.Conv``'s hook instead, but it intercepts module methods, not the hook, so it
would rebuild every convolution module during tracing and would have to compose with
the low-mode hook. The dependency is one-way: :mod:`sdpoint_jax.core` holds the
entry point and the switch and imports no backend; this module provides the
implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdpoint_jax.core.convolution import ConvFunction, conv_implementation

ConvLowering = Literal["xla", "matmul_grad"]
_P = ParamSpec("_P")
_R = TypeVar("_R")
CONV_LOWERINGS: tuple[str, ...] = ("auto", "xla", "matmul_grad")
_NHWC = ("NHWC", "HWIO", "NHWC")
MIN_GRADIENT_WORK = 32 * 32 * 32 * 16


def resolve_conv_lowering(name: str, backend: str | None = None) -> ConvLowering:
    """Maps ``"auto"`` to ``"matmul_grad"`` on CPU and ``"xla"`` elsewhere."""
    if name not in CONV_LOWERINGS:
        raise ValueError(f"conv_lowering must be one of {CONV_LOWERINGS}, got {name!r}")
    if name != "auto":
        return name  # type: ignore[return-value]
    return "matmul_grad" if (backend or jax.default_backend()) == "cpu" else "xla"


def _output_size(
    padded_shape: Sequence[int],
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[int, int]:
    """``(Ho, Wo)``: the output size of a ``kernel_hw`` window with ``strides`` over an
    ``(N, H, W, C)`` input already padded."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    return (padded_shape[1] - kh) // sh + 1, (padded_shape[2] - kw) // sw + 1


def patches_by_slices(
    x: jax.Array,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``(N, H, W, C) -> (N, Ho, Wo, kh*kw*C)``: every window of the padded input, as the
    concatenation of ``kh*kw`` strided slices (one per tap).

    Channel index ``(i * kw + j) * C + c`` holds tap ``(i, j)`` of channel ``c``, the
    row-major order of an ``HWIO`` kernel's first three axes. Its transpose (what the
    input gradient needs) is ``kh*kw`` pads of the matching channel blocks, summed: XLA
    fuses that into fast element-wise loops. Building the matrix this way is slow to
    compile, since XLA:CPU does not fuse a concatenation's operands: each tap becomes a
    kernel of its own (with the producer of ``x``, e.g. batch norm and ReLU, inlined
    into each), materialised and then copied by a concatenation kernel.
    """
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    (kh, kw), (sh, sw) = kernel_hw, strides
    out_h, out_w = _output_size(x.shape, kernel_hw, strides)
    taps = [
        x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def patches_by_gather(
    x: jax.Array,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """The same matrix as :func:`patches_by_slices` (equal element for element), built
    by one gather from the padded input, materialised first (an optimisation barrier),
    so that XLA compiles one small kernel where the slices cost ``kh*kw + 1`` kernels
    that each recompute ``x``'s producer. Its transpose would be a scatter, slow on
    CPU; :func:`conv_matmul_grad` transposes :func:`patches_by_slices` instead.

    The gather's indices, a constant, are ``(Ho, Wo, kh, kw)`` pairs of (row, column)
    of the padded input; each gathers ``x[:, row, column, :]``. A gather of whole
    ``kh x kw x C`` windows (one index pair per output position) ran slower. A 1x1
    kernel's matrix is one strided slice of ``x``, taken as such.
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    if kh * kw == 1:
        return patches_by_slices(x, kernel_hw, strides, pads)
    x = lax.optimization_barrier(jnp.pad(x, ((0, 0), *pads, (0, 0))))
    batch, channels = x.shape[0], x.shape[3]
    out_h, out_w = _output_size(x.shape, kernel_hw, strides)
    rows = (np.arange(out_h) * sh)[:, None, None, None] + np.arange(kh)[None, None, :, None]
    cols = (np.arange(out_w) * sw)[None, :, None, None] + np.arange(kw)[None, None, None, :]
    indices = np.stack(np.broadcast_arrays(rows, cols), axis=-1).astype(np.int32)
    windows = lax.gather(  # (N, Ho, Wo, kh, kw, C)
        x,
        indices,
        lax.GatherDimensionNumbers(
            offset_dims=(0, 5), collapsed_slice_dims=(1, 2), start_index_map=(1, 2)
        ),
        slice_sizes=(batch, 1, 1, channels),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return windows.reshape(batch, out_h, out_w, kh * kw * channels)


def patch_matmuls_pay(
    input_shape: Sequence[int],
    kernel_shape: Sequence[int],
    min_gradient_work: int = MIN_GRADIENT_WORK,
) -> bool:
    """The size rule (module docstring) for an ``NHWC`` input and an ``HWIO`` kernel:
    True for a 1x1 kernel, or where ``height * width * out_channels *
    min(in_channels, 32)`` is at least ``min_gradient_work``."""
    kernel_h, kernel_w, in_channels, out_channels = kernel_shape
    height, width = input_shape[1:3]
    work = height * width * out_channels * min(in_channels, 32)
    return kernel_h * kernel_w == 1 or work >= min_gradient_work


def _make_conv(
    input_shape: tuple[int, ...],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], ...],
    precision: Any,
):
    def forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision
        )

    def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)

    @jax.custom_vjp
    def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return forward(x, kernel)

    def conv_fwd(x: jax.Array, kernel: jax.Array):
        kh, kw, cin, cout = kernel.shape
        patches = patches_by_gather(x, (kh, kw), strides, pads)
        y = matmul(patches.reshape(-1, kh * kw * cin), kernel.reshape(-1, cout))
        return y.reshape(*patches.shape[:3], cout).astype(x.dtype), (patches, kernel)

    def conv_bwd(residuals, dy: jax.Array):
        patches, kernel = residuals
        kh, kw, cin, cout = kernel.shape
        dy_rows = dy.reshape(-1, cout)
        dkernel = matmul(patches.reshape(-1, kh * kw * cin).T, dy_rows)
        dpatches = matmul(dy_rows, kernel.reshape(-1, cout).T).astype(patches.dtype)
        x_aval = jax.ShapeDtypeStruct(input_shape, patches.dtype)
        patches_transpose = jax.linear_transpose(
            lambda x_: patches_by_slices(x_, (kh, kw), strides, pads), x_aval
        )
        (dx,) = patches_transpose(dpatches.reshape(patches.shape))
        return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


def conv_matmul_grad(
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
    min_gradient_work: int = MIN_GRADIENT_WORK,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (same signature, as Flax calls it).

    Plain 2-D ``NHWC``/``HWIO`` convolutions (any stride and padding, no dilation, one
    group) that are large enough (see the module docstring) are differentiated through
    the patch matrix; anything else is passed to ``lax.conv_general_dilated`` unchanged.
    ``min_gradient_work`` (see :func:`patch_matmuls_pay`) sets "large enough".
    """
    use_matmul = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and patch_matmuls_pay(lhs.shape, rhs.shape, min_gradient_work)
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
    return _make_conv(tuple(lhs.shape), strides, pads, precision)(lhs, rhs)


_IMPLEMENTATIONS: dict[str, ConvFunction] = {
    "xla": lax.conv_general_dilated,
    "matmul_grad": conv_matmul_grad,
}


def with_conv_lowering(fn: Callable[_P, _R], lowering: str) -> Callable[_P, _R]:
    """``fn`` with every layer convolution it runs lowered by ``lowering`` (one of
    :data:`CONV_LOWERINGS`; ``"auto"`` resolved now, for the default backend).

    Wrap the function that ``jax.jit`` traces, ``jax.jit(with_conv_lowering(step,
    "matmul_grad"))``: the lowering then holds on whichever thread traces it (module
    docstring). The wrapper has ``fn``'s signature (for ``jax.jit``'s static
    arguments) and name (the program's), also when ``fn`` is a ``functools.partial``.
    """
    implementation = _IMPLEMENTATIONS[resolve_conv_lowering(lowering)]

    @functools.wraps(fn)
    def lowered(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with conv_implementation(implementation):
            return fn(*args, **kwargs)

    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    lowered.__name__ = getattr(inner, "__name__", lowered.__name__)
    return lowered
