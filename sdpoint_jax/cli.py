"""What the absl command lines (``main``, ``compare``, ``time_to_accuracy``) share: quiet
library logs, and user errors reported as one ``error: ...`` line with exit status 1."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from absl import flags, logging

from sdpoint_jax.data.pipeline import DatasetUnavailableError
from sdpoint_jax.training.checkpoint import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError,
    DatasetUnavailableError,
    FileExistsError,
    FileNotFoundError,
    ValueError,
)
"""Errors that mean bad input or a missing file, not a bug: no stack trace for them."""


def quiet_library_logs() -> None:
    """Library logs at ERROR only, unless ``--verbosity`` was given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)


def report_user_errors(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``; a :data:`USER_ERRORS` exception prints ``error: ...`` on
    stderr and exits with status 1."""
    try:
        return function(*args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
