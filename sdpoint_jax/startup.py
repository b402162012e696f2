"""What every command line does first, before TensorFlow or JAX is imported.

TensorFlow, XLA and JAX log through C++ (TSL and absl) as soon as they load: a
``cpu_feature_guard`` line, oneDNN's note, ``WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR``, XLA warnings. Their C++ log
level is read once, from ``TF_CPP_MIN_LOG_LEVEL``, when the first of them loads, so it
is set here, from the program's ``--verbosity`` (:func:`define_verbosity_flag`, the
flag :mod:`sdpoint_jax.cli` also parses to set the Python library logs' level): errors
only unless ``--verbosity`` asks for more. A ``TF_CPP_MIN_LOG_LEVEL`` set by the user is
kept. Only log levels are set; nothing that changes what is computed. TensorFlow
writes some notes while it loads regardless of the level; the command lines drop
those below it (:mod:`sdpoint_jax.absl_log_filter`).

JAX sets ``TF_CPP_MIN_LOG_LEVEL`` itself (to 1, where unset) when imported, and
``python -m sdpoint_jax.X`` imports the package, hence JAX, before the program's code
runs; so the package imports this module first, and it notes the user's own setting
(:data:`USER_TF_LOG_LEVEL`) before JAX is loaded. It imports nothing heavy
(``absl.flags`` only).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

TF_LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
USER_TF_LOG_LEVEL = os.environ.get(TF_LOG_LEVEL_VARIABLE)
"""``TF_CPP_MIN_LOG_LEVEL`` as the user set it (``None``: unset), read on first import."""
ERRORS_ONLY = -2
"""absl's verbosity of ERROR: the level library logs get unless ``--verbosity`` is given."""


def define_verbosity_flag(flag_values: flags.FlagValues) -> None:
    """``--verbosity`` (``-v``) on ``flag_values``: absl's verbosity, ``None`` when absent."""
    flags.DEFINE_integer(
        "verbosity",
        None,
        "library logs (JAX, TensorFlow, tensorflow-datasets, orbax) from this level on: "
        "-2 errors, -1 warnings, 0 info, 1 debug (default: errors only)",
        short_name="v",
        flag_values=flag_values,
    )


def requested_verbosity(argv: Sequence[str]) -> int | None:
    """The ``--verbosity`` of the command line ``argv`` (program name first), or ``None``
    where it is absent or malformed (the program's own parsing reports that)."""
    flag_values = flags.FlagValues()
    define_verbosity_flag(flag_values)
    try:
        flag_values(list(argv), known_only=True)
    except flags.Error:
        return None
    return flag_values.verbosity


def tensorflow_log_level(verbosity: int | None) -> str:
    """``TF_CPP_MIN_LOG_LEVEL`` for absl ``verbosity`` (``None``: errors only).

    C++ levels are 0 info, 1 warning, 2 error, 3 fatal; absl's verbosity is 0 info,
    -1 warning, -2 error, -3 fatal, and above 0 debug (all C++ logs)."""
    level = ERRORS_ONLY if verbosity is None else verbosity
    return str(min(3, max(0, -level)))


def start_program(program_file: str, *, host_memory: bool) -> None:
    """Sets the C++ log level from ``sys.argv`` (unless the user set
    ``TF_CPP_MIN_LOG_LEVEL``) and holds TensorFlow's start-up notes to it
    (:func:`sdpoint_jax.absl_log_filter.filter_tensorflow_import`), then, where
    ``host_memory``, restarts the program in its host memory mode
    (:func:`sdpoint_jax.xla_cpu.host_memory.restart_with_host_memory`).
    Call it first in a program's ``__main__`` block with the program's ``__file__``."""
    if USER_TF_LOG_LEVEL is None:
        os.environ[TF_LOG_LEVEL_VARIABLE] = tensorflow_log_level(requested_verbosity(sys.argv))
    level = os.environ[TF_LOG_LEVEL_VARIABLE].strip()
    if level.isdigit():
        from sdpoint_jax.absl_log_filter import filter_tensorflow_import

        filter_tensorflow_import(int(level))
    if host_memory:
        from sdpoint_jax.xla_cpu.host_memory import restart_with_host_memory

        restart_with_host_memory(program_file)
