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

if __name__ == "__main__":  # before TensorFlow loads
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=False)

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags

from sdpoint_jax import cli
from sdpoint_jax.config import load_config
from sdpoint_jax.training.programs import enable_compilation_cache


class FactorsParser(flags.ArgumentParser):
    """Comma-separated zoom factors, e.g. ``1,1.25``."""

    def parse(self, argument: str | tuple[float, ...]) -> tuple[float, ...]:
        if isinstance(argument, tuple):
            return argument
        try:
            return tuple(float(part) for part in argument.split(","))
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {argument!r}") from None

    def flag_type(self) -> str:
        return "comma-separated numbers"


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_multi_string(
        "config",
        None,
        "run config file, FILE or FILE:ARG (scale: once, or once per --workdir)",
        **define,
    )
    flags.DEFINE_multi_string(
        "workdir", None, "run directory (scale: repeat to compare runs)", **define
    )
    flags.DEFINE_string("out", None, "output directory", **define)
    flags.DEFINE_integer(
        "images", None, "first N test images only (default: all)", lower_bound=1, **define
    )
    flags.DEFINE_string("data-dir", None, "overrides the configs' data.data_dir", **define)
    flags.DEFINE_multi_string(
        "label", None, "name of each run in order (default: its workdir name)", **define
    )
    flags.DEFINE(
        FactorsParser(),
        "factors",
        None,
        "comma-separated zoom factors (default: the paper's pre-crop sizes 256..352 / 256)",
        serializer=flags.CsvListSerializer(","),
        **define,
    )
    flags.DEFINE_integer("top-k", 1, "top-k hits count as correct", lower_bound=1, **define)
    flags.DEFINE_integer("examples", 8, "example images per group", lower_bound=1, **define)


def scale(flag_values: flags.FlagValues) -> list[dict]:
    """Scale sensitivity of every ``--workdir``; returns the rows."""
    from sdpoint_jax.analysis.scale import DEFAULT_FACTORS, ScaleModel, scale_run

    workdirs = [Path(workdir) for workdir in flag_values.workdir]
    config_specs = flag_values.config
    if len(config_specs) not in (1, len(workdirs)):
        raise cli.UsageError(f"give one --config or one per --workdir ({len(workdirs)})")
    labels = flag_values.label or [workdir.name for workdir in workdirs]
    if len(labels) != len(workdirs):
        raise cli.UsageError(f"give one --label per --workdir ({len(workdirs)}), or none")
    specs = config_specs * len(workdirs) if len(config_specs) == 1 else config_specs
    data_dir = flag_values["data-dir"].value
    models = [
        ScaleModel(label, load_config(spec, data_dir), workdir)
        for label, spec, workdir in zip(labels, specs, workdirs, strict=True)
    ]
    enable_compilation_cache(models[0].config.compile.cache_dir)
    return scale_run(
        models,
        Path(flag_values.out),
        images=flag_values.images,
        factors=flag_values.factors or DEFAULT_FACTORS,
    )


def difficulty(flag_values: flags.FlagValues) -> Any:
    """Cost-dependent difficulty of the one run; returns its ``DifficultyResult``."""
    from sdpoint_jax.analysis.difficulty import difficulty_run

    if len(flag_values.config) != 1 or len(flag_values.workdir) != 1:
        raise cli.UsageError("difficulty takes one --config and one --workdir")
    config = load_config(flag_values.config[0], flag_values["data-dir"].value)
    enable_compilation_cache(config.compile.cache_dir)
    return difficulty_run(
        config,
        Path(flag_values.workdir[0]),
        Path(flag_values.out),
        images=flag_values.images,
        top_k=flag_values["top-k"].value,
        examples_per_group=flag_values.examples,
    )


PROGRAM = cli.Program(
    module="sdpoint_jax.analysis",
    description=__doc__,
    define_flags=define_flags,
    commands={
        "scale": cli.Command(scale),
        "difficulty": cli.Command(difficulty),
    },
    required=("config", "workdir", "out"),
    only={
        "label": ("scale",),
        "factors": ("scale",),
        "top-k": ("difficulty",),
        "examples": ("difficulty",),
    },
)


def main(argv: Sequence[str] | None = None) -> Any:
    """Runs the command line ``argv`` (default: this process's, without the program
    name); returns the command's result: the scale rows, or the difficulty command's
    ``DifficultyResult``."""
    return cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
