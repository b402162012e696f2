"""``python -m sdpoint_jax.compare --config experiments/configs/compare_*.py --workdir DIR``.

Trains every method named in ``config.compare.methods`` with identical data, schedule and seed
(each in ``WORKDIR/<method>/``, resumable), evaluates every cost setting of each, and
writes ``WORKDIR/compare.csv`` and ``WORKDIR/compare.png`` (error against GFLOPs, a
line per method). Config fields can be overridden: ``--config.optim.num_epochs=1``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

if __name__ == "__main__":  # malloc is chosen at start-up: restart before any work
    from sdpoint_jax.xla_cpu.host_memory import restart_with_host_memory

    restart_with_host_memory(__file__)

from absl import app, flags
from ml_collections import config_flags

from sdpoint_jax.cli import quiet_library_logs, report_user_errors
from sdpoint_jax.training import parallel
from sdpoint_jax.training.programs import enable_compilation_cache

config_flags.DEFINE_config_file("config", None, "Comparison configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (one subdirectory per method).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("--config=experiments/configs/NAME.py and --workdir are required")
    quiet_library_logs()
    parallel.initialize_distributed()
    from sdpoint_jax.compare.run import run_comparison
    from sdpoint_jax.compare.trainer import Preempted

    enable_compilation_cache(FLAGS.config.compile.cache_dir)
    try:
        report_user_errors(run_comparison, FLAGS.config, FLAGS.workdir)
    except Preempted as stop:
        print(f"{stop}; run the same command again to resume", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
