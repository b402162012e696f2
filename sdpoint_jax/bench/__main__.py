"""``python -m sdpoint_jax.bench {latency,train,compile} --model M ...``; see
:mod:`sdpoint_jax.bench`. ``--help`` after a command lists its options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

if __name__ == "__main__":  # malloc is chosen at start-up: restart before any work
    from sdpoint_jax.xla_cpu.host_memory import restart_with_host_memory

    restart_with_host_memory(__file__)

from sdpoint_jax.bench import compile as compile_bench
from sdpoint_jax.bench import latency, train

COMMANDS = {
    "latency": (latency, "inference latency of every instance and batch size vs. FLOPs"),
    "train": (train, "train-step images/s: full, cheapest instance, SDPoint mix"),
    "compile": (compile_bench, "time to compile all train-step programs: serial, parallel, cached"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdpoint_jax.bench",
        description="Speed benchmarks of SDPoint instances (each writes JSON to --out).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        command = commands.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.main, parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    """Parses ``argv`` (default: the command line) and runs the command; returns what
    it wrote (latency rows, or the train or compile result)."""
    args = build_parser().parse_args(argv)
    return args.run(args, args.parser)


if __name__ == "__main__":
    main()
