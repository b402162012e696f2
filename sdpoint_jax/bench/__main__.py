"""``python -m sdpoint_jax.bench {latency,train,compile} --model M ...`` and
``python -m sdpoint_jax.bench input --dataset D --data-dir DIR``; see
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
from sdpoint_jax.bench import input as input_bench
from sdpoint_jax.bench import latency, options, train

COMMANDS = {
    "latency": cli.Command(latency.run, latency.__doc__, needs=("model",)),
    "train": cli.Command(train.run, train.__doc__, needs=("model", "batch")),
    "compile": cli.Command(compile_bench.run, compile_bench.__doc__, needs=("model",)),
    "input": cli.Command(input_bench.run, input_bench.__doc__),
}


def define_flags(flag_values: flags.FlagValues) -> None:
    """The shared target flags, then each command's own."""
    options.define_target_flags(flag_values)
    for module in (latency, train, compile_bench, input_bench):
        module.define_flags(flag_values)


PROGRAM = cli.Program(
    module="sdpoint_jax.bench",
    description=sdpoint_jax.bench.__doc__,
    define_flags=define_flags,
    commands=COMMANDS,
    only={
        "model": ("latency", "train", "compile"),
        "dtype": ("latency", "train", "compile"),
        "conv-lowering": ("latency", "train", "compile"),
        "instances": ("latency", "compile"),
        "repeats": ("latency",),
        "compiler-options": ("latency",),
        "warmup": ("latency", "input"),
        "steps": ("train", "input"),
        "host-memory": ("train",),
        "rounds": ("train",),
        "record": ("train",),
        "workers": ("compile",),
        "phases": ("compile",),
        "data-dir": ("input",),
        "split": ("input",),
    },
)


def main(argv: Sequence[str] | None = None) -> Any:
    """Runs the command line ``argv`` (default: this process's, without the program
    name); returns what the command wrote (latency rows, or the train or compile
    result)."""
    return cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
