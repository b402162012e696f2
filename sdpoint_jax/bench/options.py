"""Command-line pieces shared by the benchmarks: what is measured, and the flags naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from absl import flags

from sdpoint_jax.cli import UsageError
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data.specs import SPECS
from sdpoint_jax.models import SDPointModel, create
from sdpoint_jax.xla_cpu.conv_lowering import CONV_LOWERINGS, resolve_conv_lowering

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Target:
    """What a benchmark measures: a model, the data set fixing its input size and
    classes, the compute dtype (parameters stay float32) and the convolution lowering
    of its train-step programs (``"auto"``: the fast one for the backend; inference
    programs run XLA's convolutions) and their XLA:CPU backend optimisation level
    (``None``: XLA's default)."""

    model_name: str
    dataset: str
    dtype: str
    conv_lowering: str = "auto"
    cpu_optimization_level: int | None = None

    @property
    def image_size(self) -> int:
        """Side of the square input images, in pixels."""
        return SPECS[self.dataset].image_size

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def create_model(self) -> SDPointModel:
        """The model, with the paper's default ratios and per-instance batch norm."""
        num_classes = SPECS[self.dataset].num_classes
        return create(
            self.model_name,
            num_classes=num_classes,
            dtype=jnp.dtype(self.dtype),
        )

    def fields(self) -> dict[str, str | int | None]:
        """The ``model``, ``dataset``, ``dtype`` and resolved ``conv_lowering`` of a result."""
        return {
            "model": self.model_name,
            "dataset": self.dataset,
            "dtype": self.dtype,
            "conv_lowering": resolve_conv_lowering(self.conv_lowering),
            "cpu_optimization_level": self.cpu_optimization_level,
        }


def define_target_flags(flag_values: flags.FlagValues) -> None:
    """``--model``, ``--instances`` (read with :func:`instances`), ``--dataset``,
    ``--dtype``, ``--conv-lowering``, ``--cpu-optimization-level``, ``--out`` and
    ``--batch`` (read with
    :func:`batch_sizes` or :func:`batch_size`)."""
    define = {"flag_values": flag_values}
    flags.DEFINE_string("model", None, "e.g. wrn-16-1, wrn-28-10, resnet-50", **define)
    flags.DEFINE_string(
        "instances", "all", "the model's instances measured: 'all' or e.g. 'full,3:0.5'", **define
    )
    flags.DEFINE_enum("dataset", "cifar10", sorted(SPECS), "fixes input size and classes", **define)
    flags.DEFINE_enum("dtype", "float32", DTYPES, "compute dtype", **define)
    flags.DEFINE_enum(
        "conv-lowering",
        "auto",
        CONV_LOWERINGS,
        "auto = matmul_grad on CPU, xla elsewhere",
        **define,
    )
    flags.DEFINE_integer(
        "cpu-optimization-level",
        None,
        "XLA:CPU backend optimisation level of train-step programs, 0-3 (default: XLA's, 3)",
        lower_bound=0,
        upper_bound=3,
        **define,
    )
    flags.DEFINE_string("out", ".", "output directory", **define)
    flags.DEFINE(
        BatchSizesParser(),
        "batch",
        None,
        "latency: batch sizes, e.g. 1,32 (default: 1,32,128); train: the global batch size "
        "(required); compile: the global batch size (default: 128)",
        serializer=flags.CsvListSerializer(","),
        **define,
    )


def target_from_flags(flag_values: flags.FlagValues) -> tuple[Target, SDPointModel]:
    """The target and its model; an unknown model name is a usage error."""
    target = Target(
        flag_values.model,
        flag_values.dataset,
        flag_values.dtype,
        flag_values["conv-lowering"].value,
        flag_values["cpu-optimization-level"].value,
    )
    try:
        return target, target.create_model()
    except ValueError as err:
        raise UsageError(str(err)) from err


def instances(flag_values: flags.FlagValues, model: SDPointModel) -> list[Instance]:
    """The ``--instances`` of ``model``, in the given order, repeats dropped; an instance
    outside the model's space, or none at all, is a usage error."""
    try:
        chosen = list(dict.fromkeys(model.space.parse_list(flag_values.instances)))
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not chosen:
        raise UsageError(f"--instances {flag_values.instances!r} names no instance")
    return chosen


class BatchSizesParser(flags.ArgumentParser):
    """Comma-separated batch sizes, each ``>= 1``, e.g. ``1,32,128``; repeats dropped."""

    def parse(self, argument: str | list[int]) -> list[int]:
        if isinstance(argument, list):
            return argument
        sizes = []
        for part in (part.strip() for part in argument.split(",")):
            if not part:
                continue
            try:
                size = int(part)
            except ValueError:
                raise ValueError(
                    f"every batch size must be an integer >= 1, got {part!r}"
                ) from None
            if size < 1:
                raise ValueError(f"every batch size must be >= 1, got {size}")
            sizes.append(size)
        if not sizes:
            raise ValueError(f"expected batch sizes such as '1,32', got {argument!r}")
        return list(dict.fromkeys(sizes))

    def flag_type(self) -> str:
        return "batch sizes"


def batch_sizes(flag_values: flags.FlagValues, default: Sequence[int]) -> list[int]:
    """The ``--batch`` sizes, ``default`` where the flag is absent."""
    return list(default) if flag_values.batch is None else flag_values.batch


def batch_size(flag_values: flags.FlagValues, command: str, default: int | None = None) -> int:
    """The one ``--batch`` size of ``command`` (``default`` where the flag is absent); more
    than one is a usage error."""
    sizes = batch_sizes(flag_values, [] if default is None else [default])
    if len(sizes) != 1:
        raise UsageError(
            f"--batch: {command} takes one batch size, got {','.join(map(str, sizes))}"
        )
    return sizes[0]
