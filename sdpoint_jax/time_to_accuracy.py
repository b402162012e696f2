"""``python -m sdpoint_jax.time_to_accuracy --config FILE --workdir DIR``: wall time to
target accuracies of the plain network, low mode, SDPoint and both
(:mod:`sdpoint_jax.compare.time_to_target`)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

if __name__ == "__main__":  # malloc is chosen at start-up: restart before any work
    from sdpoint_jax.xla_cpu.host_memory import restart_with_host_memory

    restart_with_host_memory(__file__)

from absl import app, flags
from ml_collections import config_flags

from sdpoint_jax.compare.time_to_target import time_to_accuracy


def main(argv: list[str]) -> None:
    """The command line (flags defined by :func:`define_flags`)."""
    from sdpoint_jax.cli import quiet_library_logs, report_user_errors
    from sdpoint_jax.training.programs import enable_compilation_cache

    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if len(argv) != 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if config is None or not workdir:
        raise app.UsageError("--config=experiments/configs/NAME.py and --workdir are required")
    quiet_library_logs()
    enable_compilation_cache(config.compile.cache_dir)
    report_user_errors(time_to_accuracy, config, workdir)


def define_flags() -> None:
    """``--config`` and ``--workdir`` (only when run as a program: importing this
    module as a library defines no flags)."""
    config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (one subdirectory per setting).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
