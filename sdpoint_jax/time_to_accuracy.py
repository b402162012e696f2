"""``python -m sdpoint_jax.time_to_accuracy --config FILE --workdir DIR``: wall time to
target accuracies of the plain network, low mode, SDPoint and both
(:mod:`sdpoint_jax.compare.time_to_target`)."""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow loads and any work
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=True)

from collections.abc import Sequence
from typing import Any

from absl import flags

from sdpoint_jax import cli


def define_flags(flag_values: flags.FlagValues) -> None:
    """``--workdir`` (``--config`` is defined by :mod:`sdpoint_jax.cli`)."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Output directory (one subdirectory per setting).",
        flag_values=flag_values,
    )


def measure(flag_values: flags.FlagValues) -> list[dict[str, Any]]:
    """Trains every setting (or reads its finished run back); returns the rows."""
    from sdpoint_jax.compare.time_to_target import time_to_accuracy
    from sdpoint_jax.training.programs import enable_compilation_cache

    enable_compilation_cache(flag_values.config.compile.cache_dir)
    return time_to_accuracy(flag_values.config, flag_values.workdir)


PROGRAM = cli.Program(
    module="sdpoint_jax.time_to_accuracy",
    description=__doc__,
    define_flags=define_flags,
    commands=cli.Command(measure, trains=True),
    required=("config", "workdir"),
    config_file="Configuration file",
)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the command line ``argv`` (default: this process's, without the program
    name); returns one row per setting."""
    return cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
