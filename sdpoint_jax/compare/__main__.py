"""``python -m sdpoint_jax.compare --config experiments/configs/compare_*.py --workdir DIR``.

Trains every method named in ``config.compare.methods`` with identical data, schedule and seed
(each in ``WORKDIR/<method>/``, resumable), evaluates every cost setting of each, and
writes ``WORKDIR/compare.csv`` and ``WORKDIR/compare.png`` (error against GFLOPs, a
line per method). With ``config.compare.seeds`` each method runs at each seed in
``WORKDIR/seed_<k>/<method>/`` (``config.compare.single_seed_methods`` at the first
only); with ``config.compare.monitor`` too, the study report (mean and standard
deviation over seeds, paired differences, time to accuracy, learning curves) goes to
``WORKDIR/study.csv``, ``study.json`` and ``study_curves.png``. A rerun skips finished
runs and resumes interrupted ones. Config fields can be overridden:
``--config.optim.num_epochs=1``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow loads and any work
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=True)

import sys
from collections.abc import Sequence

from absl import flags

from sdpoint_jax import cli


def define_flags(flag_values: flags.FlagValues) -> None:
    """``--workdir`` (``--config`` is defined by :mod:`sdpoint_jax.cli`)."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Output directory (one subdirectory per method).",
        flag_values=flag_values,
    )


def compare(flag_values: flags.FlagValues) -> None:
    """Trains and evaluates every method; a preempted run says how to resume."""
    from sdpoint_jax.compare.run import run_comparison
    from sdpoint_jax.compare.trainer import Preempted
    from sdpoint_jax.training.programs import enable_compilation_cache

    enable_compilation_cache(flag_values.config.compile.cache_dir)
    try:
        run_comparison(flag_values.config, flag_values.workdir)
    except Preempted as stop:
        print(f"{stop}; run the same command again to resume", file=sys.stderr)


PROGRAM = cli.Program(
    module="sdpoint_jax.compare",
    description=__doc__,
    define_flags=define_flags,
    commands=cli.Command(compare, trains=True),
    required=("config", "workdir"),
    config_file="Comparison configuration file",
)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command line ``argv`` (default: this process's, without the program name)."""
    cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
