"""Command line of the paper's analyses of trained runs (see :mod:`sdpoint_jax.analysis`).

Scale sensitivity of one or more runs (``--config``/``--workdir``/``--label`` repeat, in
order; one ``--config`` may serve every workdir), e.g. SDPoint against its baseline::

    python -m sdpoint_jax.analysis scale \\
        --config experiments/configs/cifar10_quick.py --workdir runs/quick --label SDPoint \\
        --config experiments/configs/cifar10_quick.py:baseline --workdir runs/base \\
        --label baseline --out runs/analysis [--images 1000]

Cost-dependent difficulty of one SDPoint run::

    python -m sdpoint_jax.analysis difficulty --config experiments/configs/cifar10_quick.py \\
        --workdir runs/quick --out runs/analysis [--images 1000] [--top-k 1]

``--config`` is a config file as for ``sdpoint_jax.main`` (``FILE`` or ``FILE:ARG``,
``ARG`` passed to its ``get_config``); ``--data-dir`` overrides every config's
``data_dir``. A missing file, workdir or checkpoint ends with ``error: ...`` naming it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import logging

from sdpoint_jax.cli import report_user_errors
from sdpoint_jax.config import load_config
from sdpoint_jax.training.programs import enable_compilation_cache


def _factors(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdpoint_jax.analysis",
        description="Analyses of trained SDPoint runs (paper Sect. 6.2.3, Fig. 5).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scale = commands.add_parser(
        "scale", help="scale sensitivity: cosine similarity of probabilities over 7 scales"
    )
    difficulty = commands.add_parser(
        "difficulty", help="group test images by the cheapest instance that gets them right"
    )
    for command in (scale, difficulty):
        repeated = command is scale
        command.add_argument(
            "--config",
            action="append" if repeated else "store",
            required=True,
            help="run config file, FILE or FILE:ARG"
            + (" (once, or once per --workdir)" if repeated else ""),
        )
        command.add_argument(
            "--workdir",
            action="append" if repeated else "store",
            required=True,
            type=Path,
            help="run directory" + (" (repeat to compare runs)" if repeated else ""),
        )
        command.add_argument("--out", type=Path, required=True, help="output directory")
        command.add_argument(
            "--images", type=_positive, help="first N test images only (default: all)"
        )
        command.add_argument("--data-dir", help="overrides the configs' data.data_dir")
    scale.add_argument(
        "--label", action="append", help="name of each run in order (default: its workdir name)"
    )
    scale.add_argument(
        "--factors",
        type=_factors,
        help="comma-separated zoom factors (default: the paper's pre-crop sizes 256..352 / 256)",
    )
    difficulty.add_argument(
        "--top-k", type=_positive, default=1, help="top-k hits count as correct (default: 1)"
    )
    difficulty.add_argument(
        "--examples", type=_positive, default=8, help="example images per group (default: 8)"
    )
    return parser


def _scale(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    from sdpoint_jax.analysis.scale import DEFAULT_FACTORS, ScaleModel, scale_run

    workdirs = args.workdir
    if len(args.config) not in (1, len(workdirs)):
        parser.error(f"give one --config or one per --workdir ({len(workdirs)})")
    labels = args.label or [workdir.name for workdir in workdirs]
    if len(labels) != len(workdirs):
        parser.error(f"give one --label per --workdir ({len(workdirs)}), or none")
    specs = args.config * len(workdirs) if len(args.config) == 1 else args.config
    models = [
        ScaleModel(label, load_config(spec, args.data_dir), workdir)
        for label, spec, workdir in zip(labels, specs, workdirs, strict=True)
    ]
    enable_compilation_cache(models[0].config.compile.cache_dir)
    return scale_run(models, args.out, images=args.images, factors=args.factors or DEFAULT_FACTORS)


def _difficulty(args: argparse.Namespace) -> Any:
    from sdpoint_jax.analysis.difficulty import difficulty_run

    config = load_config(args.config, args.data_dir)
    enable_compilation_cache(config.compile.cache_dir)
    return difficulty_run(
        config,
        args.workdir,
        args.out,
        images=args.images,
        top_k=args.top_k,
        examples_per_group=args.examples,
    )


def main(argv: Sequence[str] | None = None) -> Any:
    """Parses ``argv`` (default: the command line) and runs the command; returns its
    result: the scale rows, or the difficulty command's ``DifficultyResult``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "scale":
        return _scale(args, parser)
    return _difficulty(args)


if __name__ == "__main__":
    logging.set_verbosity(logging.ERROR)  # keep library logs off the console
    report_user_errors(main)
