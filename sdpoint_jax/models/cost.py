"""FLOPs and parameters of every SDPoint instance, in the paper's convention, and of
every exit of a network with exits (:func:`exit_costs`).

Multiplication and addition count as two operations (paper Sect. 6). Per layer, for
one image, following the authors' ``utils/flops.py``:

* convolution: ``2 * k_h * k_w * C_in / groups`` per output element (+1 with bias);
* linear: ``2 * in * out + out``;
* batch norm: 2 per element; ReLU: 1 per element; residual addition: 1 per element;
* pooling: once per input element of each window/bin (fixed pooling counts
  ``window^2`` per output element, padding included; adaptive pooling counts every
  bin's elements, so overlapping bins count shared elements twice; the global average
  pool counts ``H * W`` per channel). The authors' counter adds a spurious ``+1`` to
  each adaptive bin's height and width and misses functional pooling calls; we count
  what is computed.

MADDs (``convention="madds"``, the convention of MSDNet's and IMTA's ``opcounter.py``
as they report it, e.g. IMTA's Table 1): the multiply-accumulates of convolutions
(``k_h * k_w * C_in / groups`` per output element) and linear layers (``in * out +
out``, the bias counted as IMTA's counter does); nothing else.

Counting is analytic, from shapes: the model is traced abstractly (``jax.eval_shape``,
no compilation, no allocation) while every leaf layer reports its cost. In low mode
(:mod:`sdpoint_jax.core.lowmode`) a convolution with a downsampled kernel counts the
kernel it runs with; the input downsampling is not a layer and is not counted.

CLI::

    python -m sdpoint_jax.flops --model wrn-28-10 --dataset cifar100 [--json]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import AdaptivePool, Add, GlobalAvgPool, Pool, Relu
from sdpoint_jax.core.lowmode import DownsampledKernelConv, LowMode
from sdpoint_jax.core.norm import KeyedBatchNorm
from sdpoint_jax.core.pooling import bin_element_count
from sdpoint_jax.core.prefix import PointTap, prefix_depth
from sdpoint_jax.models import SDPointModel

CONV_TAPS = ("all", "valid")
CONVENTIONS = ("flops", "madds")


def _size(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _valid_taps(in_size: int, out_size: int, kernel: int, stride: int, pad_before: int) -> int:
    """Kernel taps that land inside the input, summed over the outputs of one axis."""
    return sum(
        sum(1 for k in range(kernel) if 0 <= o * stride - pad_before + k < in_size)
        for o in range(out_size)
    )


def _conv_geometry(module: nn.Conv) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Kernel size and padding the convolution runs with (downsampled in low mode)."""
    hook = module.conv_general_dilated
    if isinstance(hook, DownsampledKernelConv):
        kernel_size = hook.kernel_size(module.kernel_size)
        return kernel_size, tuple((k // 2, k // 2) for k in kernel_size)
    return tuple(module.kernel_size), tuple(module.padding)


def _conv_flops(module: nn.Conv, inputs: jax.Array, output: jax.Array, *, conv_taps: str) -> int:
    per_tap = 2 * inputs.shape[-1] // module.feature_group_count
    batch, out_h, out_w, features = output.shape
    kernel_size, padding = _conv_geometry(module)
    if conv_taps == "all":
        taps = _size(kernel_size) * out_h * out_w
    else:
        taps = math.prod(
            _valid_taps(inputs.shape[axis], output.shape[axis], k, s, pad[0])
            for axis, k, s, pad in zip((1, 2), kernel_size, module.strides, padding, strict=True)
        )
    bias = out_h * out_w if module.use_bias else 0
    return batch * features * (taps * per_tap + bias)


def _dense_flops(module: nn.Dense, inputs: jax.Array, output: jax.Array) -> int:
    return _size(output.shape) * (2 * inputs.shape[-1] + int(module.use_bias))


def _adaptive_pool_flops(module: AdaptivePool, inputs: jax.Array, output: jax.Array) -> int:
    batch, in_h, in_w, channels = inputs.shape
    rows = bin_element_count(in_h, module.out_hw[0])
    cols = bin_element_count(in_w, module.out_hw[1])
    return batch * channels * rows * cols


_RULES: tuple[tuple[type, Callable[..., int]], ...] = (
    (nn.Conv, _conv_flops),
    (nn.Dense, _dense_flops),
    (KeyedBatchNorm, lambda m, x, y: 2 * _size(x.shape)),
    (Relu, lambda m, x, y: _size(x.shape)),
    (Add, lambda m, x, y: _size(y.shape)),
    (Pool, lambda m, x, y: _size(y.shape) * m.window * m.window),
    (AdaptivePool, _adaptive_pool_flops),
    (GlobalAvgPool, lambda m, x, y: _size(x.shape)),
)


def _conv_madds(module: nn.Conv, inputs: jax.Array, output: jax.Array) -> int:
    kernel_size, _ = _conv_geometry(module)
    return _size(output.shape) * _size(kernel_size) * inputs.shape[-1] // module.feature_group_count


_MADD_RULES: tuple[tuple[type, Callable[..., int]], ...] = (
    (nn.Conv, _conv_madds),
    (nn.Dense, lambda m, x, y: _size(y.shape) * (x.shape[-1] + int(m.use_bias))),
)


def _layer_cost(
    module: nn.Module, inputs: jax.Array, output: jax.Array, conv_taps: str, convention: str
) -> int | None:
    if convention == "madds":
        for kind, rule in _MADD_RULES:
            if isinstance(module, kind):
                return rule(module, inputs, output)
        return None
    return _layer_flops(module, inputs, output, conv_taps)


def _layer_flops(
    module: nn.Module, inputs: jax.Array, output: jax.Array, conv_taps: str
) -> int | None:
    for kind, rule in _RULES:
        if isinstance(module, kind):
            if kind is nn.Conv:
                return rule(module, inputs, output, conv_taps=conv_taps)
            return rule(module, inputs, output)
    return None


@dataclasses.dataclass(frozen=True)
class Cost:
    """Cost of one instance for one image."""

    instance: Instance
    flops: int
    params: int

    def as_row(self, full_flops: int) -> dict[str, Any]:
        return {
            "point": self.instance.point,
            "ratio": self.instance.ratio,
            "flops": self.flops,
            "gflops": self.flops / 1e9,
            "fraction": self.flops / full_flops,
            "params": self.params,
        }


def _image_spec(input_hw: tuple[int, int]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, *input_hw, 3), jnp.float32)


@functools.cache
def abstract_variables(model: SDPointModel, input_hw: tuple[int, int]) -> Any:
    """Shapes of ``model``'s variables (no allocation)."""
    init = functools.partial(model.init, instance=Instance.full(), train=False)
    return jax.eval_shape(init, jax.random.key(0), _image_spec(input_hw))


def count_params(model: SDPointModel, input_hw: tuple[int, int]) -> int:
    """Number of trainable parameters (batch-norm statistics excluded)."""
    params = abstract_variables(model, input_hw)["params"]
    return sum(_size(leaf.shape) for leaf in jax.tree.leaves(params))


def count_flops(
    model: SDPointModel,
    instance: Instance,
    input_hw: tuple[int, int],
    *,
    conv_taps: str = "all",
    low_mode: LowMode | None = None,
    start: int = 0,
) -> int:
    """FLOPs of one image of size ``input_hw`` through ``instance``.

    ``conv_taps="all"`` (the paper's convention) counts every kernel tap of a
    convolution; ``"valid"`` skips taps that fall on zero padding, as XLA's cost
    analysis does (it matters on small maps: a 3x3 conv on a 1x1 map has 1 valid tap).
    ``low_mode``: the cost in low mode (the model downsamples the ``input_hw`` image).
    ``start``: only the layers run after the tap of point ``start``
    (:mod:`sdpoint_jax.core.prefix`), the cost of resuming from the prefix of that
    depth; ``0``: every layer. It must be at most ``prefix_depth(instance)``.
    """
    model.space.validate(instance)
    model.check_low_mode(low_mode)
    if conv_taps not in CONV_TAPS:
        raise ValueError(f"conv_taps must be one of {CONV_TAPS}, got {conv_taps!r}")
    if low_mode is not None:
        low_mode.input_hw(input_hw)
    depth = prefix_depth(instance, model.space)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= depth:
        raise ValueError(
            f"start must be a point in 0..{depth} (the prefix instance {instance} computes "
            f"at full size), got {start!r}"
        )
    return _traced_flops(model, instance, tuple(input_hw), conv_taps, low_mode, start)


@functools.cache
def _traced_flops(
    model: SDPointModel,
    instance: Instance,
    input_hw: tuple[int, int],
    conv_taps: str,
    low_mode: LowMode | None,
    start: int,
) -> int:
    """:func:`count_flops` of checked arguments, from one abstract pass (cached: a
    model's costs never change, and evaluation, selection and reporting ask for them
    many times)."""
    total = 0
    counting = start == 0

    def count(next_fun, args, kwargs, context):
        nonlocal total, counting
        output = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return output
        if isinstance(context.module, PointTap) and context.module.index == start:
            counting = True
        elif counting:
            total += _layer_flops(context.module, args[0], output, conv_taps) or 0
        return output

    mode = {} if low_mode is None else {"low_mode": low_mode}
    apply = functools.partial(model.apply, instance=instance, train=False, **mode)
    variables = abstract_variables(model, input_hw)  # traced outside the counter
    with nn.intercept_methods(count):
        jax.eval_shape(apply, variables, _image_spec(input_hw))
    return total


def instance_costs(
    model: SDPointModel, input_hw: tuple[int, int], instances: Iterable[Instance] | None = None
) -> list[Cost]:
    """Cost of each instance (default: all ``2N + 1``, full first)."""
    params = count_params(model, input_hw)
    chosen = model.space if instances is None else instances
    return [Cost(inst, count_flops(model, inst, input_hw), params) for inst in chosen]


def format_table(costs: Sequence[Cost], full_flops: int) -> str:
    """Console table: point, ratio, GFLOPs and fraction of the full network's cost."""
    lines = [f"{'point':>5} {'ratio':>5} {'GFLOPs':>9} {'of full':>8}"]
    for cost in costs:
        ratio = "-" if cost.instance.is_full else f"{cost.instance.ratio:g}"
        lines.append(
            f"{cost.instance.point:>5} {ratio:>5} {cost.flops / 1e9:>9.3f} "
            f"{cost.flops / full_flops:>8.1%}"
        )
    return "\n".join(lines)


def _check_convention(conv_taps: str, convention: str) -> None:
    if conv_taps not in CONV_TAPS:
        raise ValueError(f"conv_taps must be one of {CONV_TAPS}, got {conv_taps!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


Event = tuple[tuple[str, ...], dict[str, int]]
"""A module call: its path in the model and its own cost in each convention (0 for
containers)."""


def trace_costs(fn: Callable[..., Any], *args: Any, conv_taps: str = "all") -> list[Event]:
    """Every Flax module call of ``fn(*args)`` traced abstractly (``jax.eval_shape``),
    in the order the calls return, with its cost by the per-layer rules of every
    convention of :data:`CONVENTIONS`.

    ``fn`` is typically ``functools.partial(model.apply, ...)`` and ``args`` abstract
    variables and an image ``ShapeDtypeStruct``; costs are for the batch of ``args``.
    """
    _check_convention(conv_taps, "flops")
    events: list[Event] = []

    def record(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        output = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            costs = {
                convention: _layer_cost(context.module, args[0], output, conv_taps, convention) or 0
                for convention in CONVENTIONS
            }
            events.append((tuple(context.module.path), costs))
        return output

    with nn.intercept_methods(record):
        jax.eval_shape(fn, *args)
    return events


@functools.cache
def abstract_exit_variables(model: nn.Module, input_hw: tuple[int, int]) -> Any:
    """Shapes of the variables of a network with exits (every exit's; no allocation)."""
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), _image_spec(input_hw))


@functools.cache
def _exit_events(
    model: nn.Module, up_to: int | None, input_hw: tuple[int, int], cascade: bool, conv_taps: str
) -> tuple[Event, ...]:
    """The traced calls of one abstract pass (cached: a model's costs never change, and
    evaluation, budgeting and reporting ask for them many times)."""
    variables = abstract_exit_variables(model, input_hw)  # traced outside the counter
    apply = functools.partial(model.apply, train=False, up_to=up_to, cascade=cascade)
    return tuple(trace_costs(apply, variables, _image_spec(input_hw), conv_taps=conv_taps))


def count_exit_flops(
    model: nn.Module,
    exit: int,
    input_hw: tuple[int, int],
    *,
    cascade: bool = False,
    conv_taps: str = "all",
    convention: str = "flops",
) -> int:
    """Cost of one image of size ``input_hw`` leaving a network with exits
    (:class:`~sdpoint_jax.models.early_exit.EarlyExitWRN`,
    :class:`~sdpoint_jax.models.msdnet.MSDNet`) at exit ``exit`` (1-based).

    ``cascade=False``: only what exit ``exit`` needs (every sample exits there: the
    SDPoint paper's EE evaluation). ``cascade=True``: exits ``1..exit`` evaluated in
    order (budgeted inference; MSDNet's and IMTA's per-exit costs).
    """
    _check_convention(conv_taps, convention)
    events = _exit_events(model, exit, tuple(input_hw), cascade, conv_taps)
    return sum(costs[convention] for _, costs in events)


def _params_of(model: nn.Module, input_hw: tuple[int, int], called: set[tuple[str, ...]]) -> int:
    """Trainable parameters of the modules at the paths ``called``."""
    params = abstract_exit_variables(model, tuple(input_hw))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(
        _size(leaf.shape)
        for path, leaf in leaves
        if tuple(str(key.key) for key in path[:-1]) in called
    )


@dataclasses.dataclass(frozen=True)
class ExitCost:
    """Cost of one image leaving at ``exit`` in budgeted inference: exits ``1..exit``
    and everything they need evaluated."""

    exit: int
    flops: int
    madds: int
    params: int

    def as_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def exit_costs(model: nn.Module, input_hw: tuple[int, int]) -> list[ExitCost]:
    """:class:`ExitCost` of every exit ``1..k`` of a network with exits, from one trace
    of all exits: the calls a network makes to compute exits ``1..k`` in order are
    those it makes for exit 1, then the further ones for exit 2, ...; the model's
    ``exit_scopes(i)`` names the top-level modules that end exit ``i``."""
    events = _exit_events(model, None, tuple(input_hw), False, "all")
    costs = []
    for i in range(1, model.num_exits + 1):
        done = events[: _exit_end(events, model.exit_scopes(i)) + 1]
        costs.append(
            ExitCost(
                i,
                sum(cost["flops"] for _, cost in done),
                sum(cost["madds"] for _, cost in done),
                _params_of(model, input_hw, {path for path, _ in done}),
            )
        )
    return costs


def _exit_end(events: Sequence[Event], scopes: Sequence[str]) -> int:
    """Index of the last call inside one of the top-level modules ``scopes``."""
    return max(
        index for index, (path, _) in enumerate(events) if path[:1] in {(s,) for s in scopes}
    )
