"""``python -m sdpoint_jax.launch --local-processes N [--devices-per-process D] -- COMMAND``:
runs ``python -m sdpoint_jax.main COMMAND`` (``--module`` another entry point) as ``N``
processes of one JAX job on this machine, coordinated over 127.0.0.1, e.g.::

    python -m sdpoint_jax.launch --local-processes 2 --devices-per-process 2 -- \\
        train --config experiments/configs/cifar10_quick.py --workdir runs/mp

Signals are forwarded to every process; when one fails, the others are stopped and the
launcher exits with status 1 (:mod:`sdpoint_jax.training.local_processes`). Clusters
(SLURM, Cloud TPU VMs, ...) start their processes themselves: see the README's
"Scaling out".
"""

from __future__ import annotations

if __name__ == "__main__":  # before any library loads and any work
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=False)

from collections.abc import Sequence

from absl import flags

from sdpoint_jax import cli


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_integer("local-processes", None, "processes to start", lower_bound=1, **define)
    flags.DEFINE_integer(
        "devices-per-process",
        None,
        "simulated CPU devices of each process (default: the platform's devices)",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_string("module", "sdpoint_jax.main", "the entry point each process runs", **define)
    flags.DEFINE_integer(
        "port", None, "coordinator port on 127.0.0.1 (default: a free one)", **define
    )
    flags.DEFINE_float(
        "grace-seconds",
        10.0,
        "after a process fails, how long the others get to stop before SIGKILL",
        lower_bound=0.0,
        **define,
    )


def launch(flag_values: flags.FlagValues, command: Sequence[str]) -> None:
    from sdpoint_jax.training.local_processes import run_local_processes

    run_local_processes(
        flag_values.module,
        command,
        processes=flag_values["local-processes"].value,
        devices=flag_values["devices-per-process"].value,
        port=flag_values.port,
        grace_seconds=flag_values["grace-seconds"].value,
    )


PROGRAM = cli.Program(
    module="sdpoint_jax.launch",
    description=__doc__,
    define_flags=define_flags,
    commands=cli.Command(launch),
    required=("local-processes",),
    trailing="the command line every process runs (of --module)",
)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command line ``argv`` (default: this process's, without the program
    name): the launcher's flags, ``--``, then the command every process runs."""
    cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
