"""``python -m sdpoint_jax.export --workdir RUN --out DIR``: trained SDPoint instances as
``jax.export`` artifacts (:mod:`sdpoint_jax.deploy.artifacts`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdpoint_jax.cli import report_user_errors
from sdpoint_jax.deploy.artifacts import (
    DEFAULT_PLATFORMS,
    PLATFORMS,
    check_platforms,
    export_run,
    run_config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdpoint_jax.export",
        description="Export trained SDPoint instances with jax.export.",
    )
    parser.add_argument("--workdir", type=Path, required=True, help="the trained run")
    parser.add_argument(
        "--instances", default="all", help="'all' or e.g. 'full,3:0.5' (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, required=True, help="new output directory")
    parser.add_argument(
        "--config", help="config file (FILE or FILE:ARG); default: the one saved with the run"
    )
    parser.add_argument("--data-dir", help="override the config's data.data_dir")
    parser.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help=f"lower for these, a subset of {PLATFORMS} (default: %(default)s)",
    )
    return parser


def _export_from_args(args: argparse.Namespace) -> dict[str, Any]:
    platforms = check_platforms(args.platforms)
    config = run_config(args.workdir, args.config, args.data_dir)
    return export_run(args.workdir, args.instances, args.out, config=config, platforms=platforms)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses ``argv`` (default: the command line) and exports; returns the manifest.
    Bad input ends with ``error: ...`` and exit status 1."""
    return report_user_errors(_export_from_args, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
