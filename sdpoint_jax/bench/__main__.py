"""``python -m sdpoint_jax.bench {latency,train,compile} --model M ...``; see
:mod:`sdpoint_jax.bench`. ``--help`` after a command describes it."""

from __future__ import annotations

if __name__ == "__main__":  # before any library loads and any work
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=True)

from collections.abc import Sequence
from typing import Any

from absl import flags

import sdpoint_jax.bench
from sdpoint_jax import cli
from sdpoint_jax.bench import compile as compile_bench
from sdpoint_jax.bench import latency, options, train

COMMANDS = {
    "latency": cli.Command(latency.run, latency.__doc__),
    "train": cli.Command(train.run, train.__doc__, needs=("batch",)),
    "compile": cli.Command(compile_bench.run, compile_bench.__doc__),
}


def define_flags(flag_values: flags.FlagValues) -> None:
    """The shared target flags, then each command's own."""
    options.define_target_flags(flag_values)
    for module in (latency, train, compile_bench):
        module.define_flags(flag_values)


PROGRAM = cli.Program(
    module="sdpoint_jax.bench",
    description=sdpoint_jax.bench.__doc__,
    define_flags=define_flags,
    commands=COMMANDS,
    required=("model",),
    only={
        "instances": ("latency",),
        "repeats": ("latency",),
        "warmup": ("latency",),
        "steps": ("train",),
        "workers": ("compile",),
    },
)


def main(argv: Sequence[str] | None = None) -> Any:
    """Runs the command line ``argv`` (default: this process's, without the program
    name); returns what the command wrote (latency rows, or the train or compile
    result)."""
    return cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
