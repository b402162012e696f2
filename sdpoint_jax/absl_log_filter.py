"""TensorFlow's C++ start-up notes, held to ``TF_CPP_MIN_LOG_LEVEL``.

TensorFlow 2.21 logs some notes through absl while its libraries load, before absl's
logging is initialised and regardless of ``TF_CPP_MIN_LOG_LEVEL``: on CPUs where it
enables oneDNN (e.g. an Intel Xeon with AVX-512) ``import tensorflow`` writes, twice::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796123395.440456   18209 port.cc:153] oneDNN custom operations are on. ...

No setting of absl's own reaches that code from Python, so :func:`filter_tensorflow_import`
captures what is written to the process's standard error (file descriptor 2) while
``tensorflow`` is first imported, and then writes it back without the absl lines below
the level (:func:`below_level`). Everything else written meanwhile (Python warnings,
other libraries' output) comes back in order, once the import ends; should the process
die inside the import, what it wrote there is lost, so run with ``--verbosity=0`` (no
filtering) to see it. Only what is shown changes, never what TensorFlow computes
(``TF_ENABLE_ONEDNN_OPTS`` is left alone).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType

ABSL_PRE_INIT_NOTICE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)
"""absl's note that it writes to standard error before it is set up (a ``WARNING``
line, dropped wherever info lines are: :func:`below_level`)."""
ABSL_LOG_LINE = re.compile(r"^([IWEF])\d{4} ")
"""An absl log line: severity letter (info, warning, error, fatal), then ``MMDD``."""
SEVERITY_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}
"""absl's severity letters as ``TF_CPP_MIN_LOG_LEVEL`` numbers them."""
FILTERED_MODULE = "tensorflow"


def below_level(line: str, level: int) -> bool:
    """Whether ``line`` is an absl log line of a severity below ``level``
    (``TF_CPP_MIN_LOG_LEVEL``: 0 info, 1 warning, 2 error, 3 fatal), or
    :data:`ABSL_PRE_INIT_NOTICE` where info lines are below it (the notice only says
    where later lines go)."""
    if line.rstrip("\r\n") == ABSL_PRE_INIT_NOTICE:
        return level > SEVERITY_LEVELS["I"]
    match = ABSL_LOG_LINE.match(line)
    return match is not None and SEVERITY_LEVELS[match.group(1)] < level


@contextlib.contextmanager
def filtered_stderr(level: int) -> Iterator[None]:
    """Captures file descriptor 2 for the block, then writes what it got back to it
    without the lines :func:`below_level` ``level``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                lines = captured.read().decode(errors="replace").splitlines(keepends=True)
                kept = "".join(line for line in lines if not below_level(line, level))
                if kept:
                    os.write(2, kept.encode())
    finally:
        os.close(saved)


class _FilteredImport(importlib.abc.MetaPathFinder):
    """Finds :data:`FILTERED_MODULE` as the other finders do and runs its first import
    inside :func:`filtered_stderr`; removes itself once it has found it."""

    def __init__(self, level: int) -> None:
        self.level = level

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != FILTERED_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_filtered(module: ModuleType) -> None:
            with filtered_stderr(self.level):
                exec_module(module)

        spec.loader.exec_module = exec_filtered  # type: ignore[method-assign]
        return spec


def filter_tensorflow_import(level: int) -> None:
    """Makes the process's first ``import tensorflow`` (direct, or through
    tensorflow-datasets) drop the absl lines below ``level`` (``TF_CPP_MIN_LOG_LEVEL``)
    from standard error. Nothing to do at level 0, where TensorFlow is imported
    already, or where this was called before."""
    if level <= 0 or FILTERED_MODULE in sys.modules:
        return
    if not any(isinstance(finder, _FilteredImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FilteredImport(level))
