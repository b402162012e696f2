"""The project's errors that mean bad input, a missing file or a machine setting, not a
bug.

A command line reports them (and ``FileExistsError``, ``FileNotFoundError`` and
``ValueError``) as one ``error: ...`` line without a stack trace
(:data:`sdpoint_jax.cli.USER_ERRORS`). They live here, apart from the modules that
raise them, so that reporting one never loads TensorFlow or orbax.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the state it is restored into."""


class DatasetUnavailableError(RuntimeError):
    """The data set is not prepared in the searched directory and could not be downloaded."""


class ProcessFailedError(RuntimeError):
    """A process of a local multi-process job failed; the others were stopped."""


class MemoryMapLimitError(RuntimeError):
    """Compiling another program would pass the process's memory-map cap
    (:mod:`sdpoint_jax.xla_cpu.memory_maps`)."""
