"""Huge pages for the host memory that XLA:CPU programs allocate on every run.

An XLA:CPU execution allocates its temporaries (about 2 GiB for a WRN-16-4 train step
at batch 128) with ``malloc`` and frees them when it ends. glibc serves blocks that
large with fresh ``mmap`` pages and unmaps them on ``free``, so every step faults its
temporaries in again, 4 KiB at a time: building one 302 MB patch matrix
(:mod:`sdpoint_jax.conv_lowering`) took 299 ms inside a program, 92 ms without the
faults. glibc's tunable ``glibc.malloc.hugetlb=1`` makes ``malloc`` ask for transparent
huge pages (``madvise(MADV_HUGEPAGE)``), so the same memory is faulted in 2 MiB at a
time. Memory is still returned to the system as before. Measured on a 2-core x86 CPU
(WRN-16-4, batch 128, ``python -m sdpoint_jax.bench train``): full-network step
2.70 s instead of 3.28 s, SDPoint mix 2.58 s instead of 2.80 s, cheapest instance
1.07 s instead of 1.27 s; batch-1 inference unchanged (7.58 vs 7.59 ms).

Each step still zeroes its fresh pages (about 3 GB for that full step), and the full
network gains most. Keeping freed memory in the process instead (``mallopt``: one
arena, no ``mmap``, no trimming) removed the zeroing too and made the mix track its
FLOPs (81.5% of the full step for 80.3% of its FLOPs), but the heap fragmented and
kept growing (WRN-16-2, 60 mixed steps: 2.9 to 5.1 GiB resident) and one shared arena
made batch-1 inference 5-10% slower, so it is not done.

glibc reads tunables only when a process starts. So the command-line programs call
:func:`restart_with_huge_pages` first thing: where it is wanted and not yet set, the
program starts itself again (``exec``, same interpreter, arguments and environment)
with the tunable added to ``GLIBC_TUNABLES``. It is wanted on Linux with glibc, where
the kernel's transparent huge pages are in ``madvise`` mode (in ``always`` mode every
large block gets them anyway; in ``never`` mode nothing can), and where JAX will run on
the CPU: ``JAX_PLATFORMS`` starts with ``cpu``, or no accelerator plugin is installed.
``SDPOINT_JAX_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "SDPOINT_JAX_HUGE_PAGES"
"""``0`` keeps glibc's default ``malloc`` pages; ``1`` (the default) asks for huge ones."""
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _accelerator_plugin_installed() -> bool:
    """Whether JAX would find a TPU library or a PJRT plugin (CUDA, ROCm, ...)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    namespace = importlib.util.find_spec("jax_plugins")
    locations = namespace.submodule_search_locations if namespace else None
    return bool(locations) and any(True for _ in pkgutil.iter_modules(locations))


def cpu_backend_expected(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether JAX's default backend will be the CPU, judged without importing JAX: the
    first of ``JAX_PLATFORMS`` where that is set, else no accelerator plugin."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_plugin_installed()


def transparent_huge_page_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), or
    None where it cannot be read."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return None
    selected = [word[1:-1] for word in text.split() if word.startswith("[")]
    return selected[0] if selected else None


def huge_pages_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a process with ``environ`` should run with :data:`TUNABLE` (see the
    module docstring); ``ValueError`` unless :data:`OPT_OUT_VARIABLE` is unset, 0 or 1."""
    switch = environ.get(OPT_OUT_VARIABLE, "1")
    if switch not in ("0", "1"):
        raise ValueError(f"{OPT_OUT_VARIABLE} must be 0 or 1, got {switch!r}")
    return (
        switch == "1"
        and platform.system() == "Linux"
        and platform.libc_ver()[0] == "glibc"
        and transparent_huge_page_mode() == "madvise"
        and cpu_backend_expected(environ)
    )


def huge_pages_set(environ: Mapping[str, str]) -> bool:
    """Whether ``environ``'s ``GLIBC_TUNABLES`` holds :data:`TUNABLE`."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with :data:`TUNABLE` added to ``GLIBC_TUNABLES`` (kept if present)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        tunables.append(TUNABLE)
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables)}


def without_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with glibc's default pages (for a child process measured as it would
    run by default)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
    environ = {key: value for key, value in environ.items() if key != "GLIBC_TUNABLES"}
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables)} if tunables else environ


def restart_with_huge_pages(program_file: str) -> None:
    """Starts this program again with :data:`TUNABLE` set, where it is wanted and not
    set yet; otherwise returns. Call it first in a program's ``__main__`` block, before
    any work, with the program's ``__file__`` (the process is replaced; nothing after
    the call runs in it). Nothing happens unless the process was started as that
    program (``sys.argv[0]``), so running its module inside another program (``runpy``
    in a notebook) never replaces that process."""
    started_as_program = os.path.realpath(sys.argv[0]) == os.path.realpath(program_file)
    try:
        wanted = started_as_program and huge_pages_wanted()
    except ValueError as err:
        sys.exit(f"error: {err}")
    environ = with_huge_pages(os.environ)
    if not wanted or environ == dict(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
