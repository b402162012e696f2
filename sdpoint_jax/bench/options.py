"""Command-line pieces shared by the benchmarks: what is measured and argument types."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp

from sdpoint_jax.data.specs import SPECS
from sdpoint_jax.models import SDPointModel, create
from sdpoint_jax.xla_cpu.conv_lowering import CONV_LOWERINGS, resolve_conv_lowering

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Target:
    """What a benchmark measures: a model, the data set fixing its input size and
    classes, the compute dtype (parameters stay float32) and the convolution lowering
    of its train-step programs (``"auto"``: the fast one for the backend; inference
    programs run XLA's convolutions)."""

    model_name: str
    dataset: str
    dtype: str
    conv_lowering: str = "auto"

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

    def fields(self) -> dict[str, str]:
        """The ``model``, ``dataset``, ``dtype`` and resolved ``conv_lowering`` of a result."""
        return {
            "model": self.model_name,
            "dataset": self.dataset,
            "dtype": self.dtype,
            "conv_lowering": resolve_conv_lowering(self.conv_lowering),
        }


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dataset``, ``--dtype``, ``--conv-lowering`` and ``--out``."""
    parser.add_argument("--model", required=True, help="e.g. wrn-16-1, wrn-28-10, resnet-50")
    parser.add_argument(
        "--dataset",
        choices=sorted(SPECS),
        default="cifar10",
        help="fixes input size and classes (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="compute dtype (default: %(default)s)"
    )
    parser.add_argument(
        "--conv-lowering",
        choices=CONV_LOWERINGS,
        default="auto",
        help="auto = matmul_grad on CPU, xla elsewhere (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="output directory (default: current)"
    )


def target_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[Target, SDPointModel]:
    """The target and its model; an unknown model name is a usage error."""
    target = Target(args.model, args.dataset, args.dtype, args.conv_lowering)
    try:
        return target, target.create_model()
    except ValueError as err:
        parser.error(str(err))


def at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``, the error naming ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {value}")
        return value

    return parse


def batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated batch sizes, each ``>= 1``, e.g. ``1,32,128``."""
    parse = at_least(1, "every batch size")
    sizes = [parse(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as '1,32', got {text!r}")
    return list(dict.fromkeys(sizes))
