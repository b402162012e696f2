"""The one convolution every layer runs, and which implementation runs it.

Layers hand :func:`conv_general_dilated` to ``flax.linen.Conv`` (its
``conv_general_dilated`` hook). It has ``lax.conv_general_dilated``'s signature and
calls the implementation active while it runs, ``lax.conv_general_dilated`` unless a
caller installed another with :func:`conv_implementation`. Under ``jax.jit`` it runs
while the program is traced, so the implementation active during tracing is compiled
into the program; once compiled, the program no longer depends on it.

How a convolution is lowered is thus a property of a program, decided where the
program is built, not of a model: models, their contexts and their layers carry no
lowering, and the same model traces into a training program with one lowering and
an inference program with another. Backends provide implementations (e.g.
:mod:`sdpoint_jax.xla_cpu.conv_lowering`); this module imports none of them.

The active implementation is a :class:`contextvars.ContextVar`, so it holds in the
thread (and asynchronous task) that installed it: programs traced on compile threads
must install it inside the traced function, not around the code that starts the
threads (:func:`sdpoint_jax.xla_cpu.conv_lowering.with_conv_lowering` does). A function
jitted on its own and called inside a traced function is traced once per argument
signature, with the implementation active at its first trace.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax import lax

ConvFunction = Callable[..., jax.Array]
"""A function with ``lax.conv_general_dilated``'s signature and semantics."""

_IMPLEMENTATION: contextvars.ContextVar[ConvFunction] = contextvars.ContextVar(
    "sdpoint_jax_conv_implementation", default=lax.conv_general_dilated
)


def conv_general_dilated(
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
) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments, as ``flax.linen.Conv`` passes
    them) computed by the active implementation (module docstring)."""
    return _IMPLEMENTATION.get()(
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


@contextlib.contextmanager
def conv_implementation(implementation: ConvFunction) -> Iterator[None]:
    """Makes ``implementation`` compute :func:`conv_general_dilated` in this context
    until the block exits (then the previous one is restored)."""
    if not callable(implementation):
        raise TypeError(f"a convolution implementation must be callable, got {implementation!r}")
    token = _IMPLEMENTATION.set(implementation)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)
