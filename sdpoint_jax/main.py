"""Command line: ``python -m sdpoint_jax.main COMMAND --config FILE --workdir DIR``.

Commands:
  train       train with SDPoint (``--resume`` continues the newest intact checkpoint,
              ``--resume-step N`` step N)
  calibrate   recompute every instance's BN statistics over fixed training batches
  evaluate    top-1/top-5 error of every instance (instance BN and UBN), FLOPs, plot;
              ``--cascade`` also a confidence cascade across the instances, its
              thresholds fit on ``config.data.holdout_split``, each stage resuming
              from the prefix an earlier stage computed (``--cascade-cost=summed``:
              the earlier accounting, every stage from the image)
  select      the best evaluated instance within ``--budget-gflops`` or ``--budget-ms``
  all         train, calibrate and evaluate in one go

Any config field can be overridden: ``--config.optim.num_epochs=10``,
``--config.data.data_dir=/path/to/tensorflow_datasets``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow loads and any work
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=True)

import functools
from collections.abc import Sequence
from typing import Any

from absl import flags

from sdpoint_jax import cli

STEPS = ("train", "calibrate", "evaluate")


def define_flags(flag_values: flags.FlagValues) -> None:
    """The flags besides ``--config`` (defined by :mod:`sdpoint_jax.cli`)."""
    define = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).", **define)
    flags.DEFINE_bool(
        "resume",
        False,
        "Continue from the newest intact checkpoint (damaged newer ones are moved aside).",
        **define,
    )
    flags.DEFINE_integer(
        "resume-step",
        None,
        "Continue from this checkpoint step (newer steps are moved aside).",
        lower_bound=0,
        **define,
    )
    flags.DEFINE_string("instances", "all", "'all' or e.g. 'full,3:0.5,12:0.75'.", **define)
    flags.DEFINE_bool(
        "cascade",
        False,
        "Also a confidence cascade across the instances, thresholds fit on "
        "config.data.holdout_split (cascade.csv, cascade.json, a curve on cost_error.png).",
        **define,
    )
    flags.DEFINE_enum(
        "cascade-cost",
        "prefix",
        ["prefix", "summed"],
        "How the cascade counts a stage's cost: 'prefix' (it resumes from the prefix an "
        "earlier stage computed) or 'summed' (every stage runs from the image).",
        **define,
    )
    flags.DEFINE_float("budget-gflops", None, "GFLOPs per image budget.", **define)
    flags.DEFINE_float("budget-ms", None, "Milliseconds per batch budget.", **define)
    flags.DEFINE_string("latency", None, "Latency table (default WORKDIR/latency.json).", **define)
    flags.DEFINE_integer("batch", None, "Batch size of the latency table to use.", **define)


def run_steps(flag_values: flags.FlagValues, steps: Sequence[str]) -> None:
    """Runs those of train, calibrate and evaluate that are in ``steps``, in that order."""
    from sdpoint_jax.evaluation.workflow import calibrate_run, cascade_holdout, evaluate_run
    from sdpoint_jax.training.loop import train
    from sdpoint_jax.training.programs import enable_compilation_cache

    config, workdir = flag_values.config, flag_values.workdir
    enable_compilation_cache(config.compile.cache_dir)
    if flag_values.cascade and "train" in steps and "evaluate" in steps:
        cascade_holdout(config)  # a missing holdout_split fails now, not after training
    if "train" in steps:
        train(
            config,
            workdir,
            resume=flag_values.resume,
            resume_step=flag_values["resume-step"].value,
        )
    if "calibrate" in steps:
        calibrate_run(config, workdir)
    if "evaluate" in steps:
        evaluate_run(
            config,
            workdir,
            flag_values.instances,
            cascade=flag_values.cascade,
            cascade_cost=flag_values["cascade-cost"].value,
        )


def select(flag_values: flags.FlagValues) -> dict:
    """The best evaluated instance within the budget (printed and returned)."""
    from sdpoint_jax.evaluation.selection import select_run

    return select_run(
        flag_values.workdir,
        budget_gflops=flag_values["budget-gflops"].value,
        budget_ms=flag_values["budget-ms"].value,
        latency_file=flag_values.latency,
        batch=flag_values.batch,
    )


def _steps(*steps: str) -> cli.Command:
    return cli.Command(functools.partial(run_steps, steps=steps), needs=("config",), trains=True)


PROGRAM = cli.Program(
    module="sdpoint_jax.main",
    description=__doc__,
    define_flags=define_flags,
    commands={
        "train": _steps("train"),
        "calibrate": _steps("calibrate"),
        "evaluate": _steps("evaluate"),
        "select": cli.Command(select),
        "all": _steps(*STEPS),
    },
    required=("workdir",),
    only={
        "resume": ("train", "all"),
        "resume-step": ("train", "all"),
        "instances": ("evaluate", "all"),
        "cascade": ("evaluate", "all"),
        "cascade-cost": ("evaluate", "all"),
        "budget-gflops": ("select",),
        "budget-ms": ("select",),
        "latency": ("select",),
        "batch": ("select",),
    },
    config_file="Run configuration file",
)


def main(argv: Sequence[str] | None = None) -> Any:
    """Runs the command line ``argv`` (default: this process's, without the program
    name); returns what the command returns (``select``: the chosen row)."""
    return cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
