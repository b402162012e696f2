"""``python -m sdpoint_jax.export --workdir RUN --out DIR``: trained SDPoint instances as
``jax.export`` artifacts (:mod:`sdpoint_jax.deploy.artifacts`)."""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow loads
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=False)

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags

from sdpoint_jax import cli
from sdpoint_jax.deploy.platforms import DEFAULT_PLATFORMS, PLATFORMS, check_platforms


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "the trained run", **define)
    flags.DEFINE_string("instances", "all", "'all' or e.g. 'full,3:0.5'", **define)
    flags.DEFINE_string("out", None, "new output directory", **define)
    flags.DEFINE_string(
        "config",
        None,
        "config file (FILE or FILE:ARG); default: the one saved with the run",
        **define,
    )
    flags.DEFINE_string("data-dir", None, "override the config's data.data_dir", **define)
    flags.DEFINE_string(
        "platforms",
        ",".join(DEFAULT_PLATFORMS),
        f"lower for these, a subset of {PLATFORMS}",
        **define,
    )


def export(flag_values: flags.FlagValues) -> dict[str, Any]:
    """Exports the chosen instances; returns the manifest."""
    platforms = check_platforms(flag_values.platforms)
    from sdpoint_jax.deploy.artifacts import export_run, run_config  # JAX: past the checks

    workdir = Path(flag_values.workdir)
    config = run_config(workdir, flag_values.config, flag_values["data-dir"].value)
    return export_run(
        workdir, flag_values.instances, Path(flag_values.out), config=config, platforms=platforms
    )


PROGRAM = cli.Program(
    module="sdpoint_jax.export",
    description=__doc__,
    define_flags=define_flags,
    commands=cli.Command(export),
    required=("workdir", "out"),
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line ``argv`` (default: this process's, without the program
    name); returns the manifest."""
    return cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
