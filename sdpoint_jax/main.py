"""Command line: ``python -m sdpoint_jax.main COMMAND --config FILE --workdir DIR``.

Commands:
  train       train with SDPoint (``--resume`` continues the latest checkpoint)
  calibrate   recompute every instance's BN statistics over fixed training batches
  evaluate    top-1/top-5 error of every instance (instance BN and UBN), FLOPs, plot;
              ``--cascade`` also a confidence cascade across the instances, its
              thresholds fit on ``config.data.holdout_split``
  select      the best evaluated instance within ``--budget-gflops`` or ``--budget-ms``
  all         train, calibrate and evaluate in one go

Any config field can be overridden: ``--config.optim.num_epochs=10``,
``--config.data.data_dir=/path/to/tensorflow_datasets``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

if __name__ == "__main__":  # malloc is chosen at start-up: restart before any work
    from sdpoint_jax.xla_cpu.host_memory import restart_with_host_memory

    restart_with_host_memory(__file__)

from absl import app, flags
from ml_collections import config_flags

from sdpoint_jax.cli import quiet_library_logs, report_user_errors
from sdpoint_jax.training import parallel
from sdpoint_jax.training.programs import enable_compilation_cache

COMMANDS = ("train", "calibrate", "evaluate", "select", "all")

config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).")
flags.DEFINE_bool("resume", False, "train/all: continue from the latest checkpoint.")
flags.DEFINE_string("instances", "all", "evaluate: 'all' or e.g. 'full,3:0.5,12:0.75'.")
flags.DEFINE_bool(
    "cascade",
    False,
    "evaluate/all: also a confidence cascade across the instances, thresholds fit on "
    "config.data.holdout_split (cascade.csv, cascade.json, a curve on cost_error.png).",
)
flags.DEFINE_float("budget-gflops", None, "select: GFLOPs per image budget.")
flags.DEFINE_float("budget-ms", None, "select: milliseconds per batch budget.")
flags.DEFINE_string("latency", None, "select: latency table (default WORKDIR/latency.json).")
flags.DEFINE_integer("batch", None, "select: batch size of the latency table to use.")
FLAGS = flags.FLAGS


def run_command(command: str) -> None:
    from sdpoint_jax.evaluation.workflow import (
        calibrate_run,
        cascade_holdout,
        evaluate_run,
        select_run,
    )
    from sdpoint_jax.training.loop import train

    if command == "select":
        select_run(
            FLAGS.workdir,
            budget_gflops=FLAGS["budget-gflops"].value,
            budget_ms=FLAGS["budget-ms"].value,
            latency_file=FLAGS.latency,
            batch=FLAGS.batch,
        )
        return
    config = FLAGS.config
    if config is None:
        raise app.UsageError(f"{command} needs --config=experiments/configs/NAME.py")
    enable_compilation_cache(config.compile.cache_dir)
    if command == "all" and FLAGS.cascade:
        cascade_holdout(config)  # a missing holdout_split fails now, not after training
    if command in ("train", "all"):
        train(config, FLAGS.workdir, resume=FLAGS.resume)
    if command in ("calibrate", "all"):
        calibrate_run(config, FLAGS.workdir)
    if command in ("evaluate", "all"):
        evaluate_run(config, FLAGS.workdir, FLAGS.instances, cascade=FLAGS.cascade)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command out of {', '.join(COMMANDS)}; got {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    quiet_library_logs()
    parallel.initialize_distributed()
    report_user_errors(run_command, argv[1])


if __name__ == "__main__":
    app.run(main)
