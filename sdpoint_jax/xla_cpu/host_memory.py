"""Host memory for XLA:CPU programs: a ``malloc`` that keeps what a step frees.

An XLA:CPU execution allocates its temporaries (gigabytes for a WRN train step at
batch 128) with ``malloc`` when it starts and frees them when it ends. glibc serves
blocks that large with fresh ``mmap`` pages and unmaps them on ``free``, so every step
faults its temporaries in again, 4 KiB at a time, and the kernel zeroes each page:
building one patch matrix (:mod:`sdpoint_jax.xla_cpu.conv_lowering`) inside a program
took far longer than without the faults. Under a hypervisor that takes back a
guest's free memory (free page reporting, as in many cloud VMs) it is worse: memory
left free for a second or two costs host faults when touched again, so a step's cost
depended on what ran before it (a full WRN-16-4 step took longer after a pause, the
difference all system time). SDPoint training switches programs every step, so the
full network's larger temporaries were always "cold". The measurements are in
``benchmarks/README.md`` ("Training step" and "Host memory").

Where it can, a command-line program therefore restarts itself once with a different
host memory mode (:data:`MODE_VARIABLE`, one of :data:`MODES`):

``tcmalloc``
    ``LD_PRELOAD`` of gperftools' tcmalloc (``libtcmalloc_minimal``; Debian/Ubuntu
    package ``libtcmalloc-minimal4``). It keeps freed memory in the process and reuses
    it, so most steps fault and zero no pages: a full step takes no system time, back
    to back, after another program or after a pause alike. With gperftools' own
    default (``TCMALLOC_RELEASE_RATE=1``) tcmalloc still hands free memory back to the
    kernel now and then, so some steps fault theirs in again: on an AMD EPYC (AVX2)
    the SDPoint mix, which switches programs every step, ran at 1.22x its FLOPs
    expectation. This mode sets ``TCMALLOC_RELEASE_RATE=0`` (never hand memory back),
    which ran it at 0.98x there, for about 1.6x the peak resident memory; on an Intel
    Xeon with AVX-512 the two rates were within that machine's noise
    (``benchmarks/README.md``, "tcmalloc against huge pages, and tcmalloc's release
    rate"). Set the variable yourself to choose another rate; a user's value is kept.
``huge-pages``
    glibc's tunable ``glibc.malloc.hugetlb=1``: ``malloc`` asks for transparent huge
    pages (``madvise(MADV_HUGEPAGE)``), so the same memory is faulted in 2 MiB at a
    time (far fewer faults) but still returned and zeroed after every step: faster
    than glibc's defaults, slower than tcmalloc.
``default``
    The process as started.
``auto`` (the default)
    On a CPU backend (``JAX_PLATFORMS`` starts with ``cpu``, or no accelerator plugin
    is installed) on Linux with glibc: the mode recorded as fastest on this machine
    (below), else the fixed preference: ``tcmalloc`` where the library is installed,
    else ``huge-pages`` where the kernel's transparent huge pages are in ``madvise``
    mode (in ``always`` mode large blocks get them anyway), else ``default``. A process
    whose ``LD_PRELOAD`` already names an allocator (``*malloc*``) is left as it is,
    and a user's own ``glibc.malloc.hugetlb`` setting is kept.

Which mode is fastest depends on the machine: on one AMD EPYC with AVX-512, tcmalloc
made the SDPoint mix slower against its FLOPs than huge pages did, and on an Intel Xeon
with AVX-512 it was no faster. So ``auto`` can be chosen from measurement::

    python -m sdpoint_jax.bench train --model wrn-16-4 --batch 128 --steps 24 \\
        --host-memory=all --rounds 3 --record

runs the train benchmark once per available mode and round (each in a child process
started in that mode, modes alternating) and records the mode whose SDPoint mix step
was fastest (median over the rounds) in :func:`record_path` (under the project's cache
directory, one file per host name), with this machine's CPU model, kernel release and
glibc version (:func:`sdpoint_jax.machine.identity`) and the figures. ``auto`` uses the
recorded mode while all three still match and the mode is still available
(:func:`available_modes`); otherwise, or where the record cannot be read (a warning
says so), the fixed preference. Delete the file to go back to the preference.

Programs report the mode they run in and where it came from (:func:`mode_source`:
``environment``, ``recorded`` or ``preference``); the benchmarks write both into
their JSON (``host_memory``, ``host_memory_source``).

Keeping freed memory with glibc itself (``mallopt``: one arena, no ``mmap``, no
trimming) was tried and is not used: its heap fragmented and kept growing, and one
shared arena made batch-1 inference slower.

``malloc`` is chosen when a process starts (``LD_PRELOAD``, ``GLIBC_TUNABLES``), hence
the restart: programs call :func:`restart_with_host_memory` first thing. In your own
programs, set the variables before Python starts.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import platform
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdpoint_jax import machine
from sdpoint_jax.cache_dir import cache_dir

MODE_VARIABLE = "SDPOINT_JAX_HOST_MEMORY"
MODES = ("auto", "tcmalloc", "huge-pages", "default")
CONCRETE_MODES = MODES[1:]
"""The modes a process can run in (``auto`` resolves to one of them)."""
SOURCE_VARIABLE = "SDPOINT_JAX_HOST_MEMORY_SOURCE"
"""Set by :func:`restart_with_host_memory` in the restarted process: how its mode was
chosen (one of :data:`SOURCES`)."""
SOURCES = ("environment", "recorded", "preference")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
"""Library names searched for tcmalloc, in order (``ctypes.util.find_library``)."""
TCMALLOC_SETTINGS = {
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**50),
    "TCMALLOC_RELEASE_RATE": "0",
}
"""Set unless the user set them. The threshold: without it, tcmalloc prints a stack line
to stderr for each allocation over 1 GiB (a WRN-28-10 step makes several). The release
rate: never hand freed memory back to the kernel, so that steps do not fault in again
temporaries that tcmalloc would otherwise have released (module docstring)."""
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


@functools.cache
def tcmalloc_library() -> str | None:
    """The installed tcmalloc library's name (for ``LD_PRELOAD``), or None. Looked up
    once per process: each ``find_library`` runs ``ldconfig``, which is slow where the
    library is missing (``benchmarks/README.md``, "Host memory")."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _preloads(environ: Mapping[str, str]) -> list[str]:
    return [entry for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split() if entry]


def allocator_preloaded(environ: Mapping[str, str]) -> bool:
    """Whether ``environ``'s ``LD_PRELOAD`` names an allocator (jemalloc, tcmalloc, ...)."""
    return any("malloc" in os.path.basename(entry) for entry in _preloads(environ))


def requested_mode(environ: Mapping[str, str] = os.environ) -> str:
    """:data:`MODE_VARIABLE`'s value (``auto`` where unset); ``ValueError`` naming
    :data:`MODES` for any other value."""
    mode = environ.get(MODE_VARIABLE, "auto")
    if mode not in MODES:
        raise ValueError(f"{MODE_VARIABLE} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def available_modes() -> tuple[str, ...]:
    """The :data:`CONCRETE_MODES` this machine can run: ``tcmalloc`` where the library is
    installed, ``huge-pages`` on Linux with glibc where transparent huge pages are in
    ``madvise`` or ``always`` mode, and ``default``."""
    linux_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    available = {
        "tcmalloc": tcmalloc_library() is not None,
        "huge-pages": linux_glibc and transparent_huge_page_mode() in ("madvise", "always"),
        "default": True,
    }
    return tuple(mode for mode in CONCRETE_MODES if available[mode])


def record_path() -> Path:
    """Where :func:`write_record` keeps this machine's choice:
    ``<cache dir>/host_memory/<host name>.json`` (:func:`sdpoint_jax.cache_dir.cache_dir`)."""
    return cache_dir() / "host_memory" / f"{platform.node() or 'localhost'}.json"


def write_record(mode: str, figures: Mapping[str, Any]) -> Path:
    """Records ``mode`` (one of :data:`CONCRETE_MODES`) as this machine's fastest, with
    :func:`sdpoint_jax.machine.identity` and ``figures`` (what it was chosen from);
    returns the file."""
    if mode not in CONCRETE_MODES:
        raise ValueError(f"mode must be one of {', '.join(CONCRETE_MODES)}; got {mode!r}")
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"mode": mode, **machine.identity(), "figures": dict(figures)}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_record(path: Path | None = None) -> dict[str, Any] | None:
    """The record at ``path`` (default :func:`record_path`), None where there is none;
    an unreadable or malformed one is None with a warning naming the file."""
    path = record_path() if path is None else path
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(f"ignoring the host memory record {path}: {err}", stacklevel=2)
        return None
    fields = ("mode", *machine.identity())
    if not (
        isinstance(record, dict)
        and all(isinstance(record.get(field), str) for field in fields)
        and record["mode"] in CONCRETE_MODES
    ):
        warnings.warn(
            f"ignoring the host memory record {path}: expected a JSON object with "
            f"{', '.join(fields)} (mode one of {', '.join(CONCRETE_MODES)})",
            stacklevel=2,
        )
        return None
    return record


def recorded_mode() -> str | None:
    """The recorded mode (:func:`read_record`) where the record's CPU model, kernel
    release and glibc version are this machine's and the mode is available here; else
    None."""
    record = read_record()
    if record is None:
        return None
    if any(record[key] != value for key, value in machine.identity().items()):
        return None
    return record["mode"] if record["mode"] in available_modes() else None


def resolve(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The mode a program started with ``environ`` runs in and its source (one of
    :data:`SOURCES`): ``environment`` where :data:`MODE_VARIABLE` names a mode or an
    allocator is preloaded already, else ``auto`` resolved as in the module docstring,
    ``recorded`` or ``preference``. ``ValueError`` for a bad :data:`MODE_VARIABLE`, or
    for ``tcmalloc`` where it is not installed."""
    mode = requested_mode(environ)
    if mode == "tcmalloc" and tcmalloc_library() is None:
        raise ValueError(
            f"{MODE_VARIABLE}=tcmalloc, but no tcmalloc library was found (searched "
            f"{', '.join('lib' + name for name in TCMALLOC_LIBRARIES)}); install it "
            "(Debian/Ubuntu: apt install libtcmalloc-minimal4) or choose another of "
            f"{', '.join(MODES)}"
        )
    if mode != "auto":
        return mode, "environment"
    if allocator_preloaded(environ):
        return "default", "environment"
    if not (
        platform.system() == "Linux"
        and platform.libc_ver()[0] == "glibc"
        and cpu_backend_expected(environ)
    ):
        return "default", "preference"
    recorded = recorded_mode()
    if recorded is not None:
        return recorded, "recorded"
    if tcmalloc_library() is not None:
        return "tcmalloc", "preference"
    return ("huge-pages" if transparent_huge_page_mode() == "madvise" else "default"), "preference"


def resolved_mode(environ: Mapping[str, str] = os.environ) -> str:
    """The mode of :func:`resolve`."""
    return resolve(environ)[0]


def with_tcmalloc(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with tcmalloc first in ``LD_PRELOAD`` (once) and
    :data:`TCMALLOC_SETTINGS` where unset; ``ValueError`` where it is not installed."""
    library = tcmalloc_library()
    if library is None:
        raise ValueError("no tcmalloc library was found")
    preloads = _preloads(environ)
    if library not in preloads:
        preloads.insert(0, library)
    return {**TCMALLOC_SETTINGS, **environ, "LD_PRELOAD": " ".join(preloads)}


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with :data:`HUGE_PAGES_TUNABLE` added to ``GLIBC_TUNABLES`` (a user's
    own ``glibc.malloc.hugetlb`` setting is kept)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        tunables.append(HUGE_PAGES_TUNABLE)
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables)}


def environment_for(mode: str, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` set up for ``mode`` (one of :data:`MODES` but ``auto``)."""
    setups = {"tcmalloc": with_tcmalloc, "huge-pages": with_huge_pages, "default": dict}
    return setups[mode](environ)


def active_mode(environ: Mapping[str, str] = os.environ) -> str:
    """The mode ``environ`` already carries: ``tcmalloc``, ``huge-pages`` or ``default``."""
    if any("tcmalloc" in os.path.basename(entry) for entry in _preloads(environ)):
        return "tcmalloc"
    tunables = environ.get("GLIBC_TUNABLES", "").split(":")
    return "huge-pages" if HUGE_PAGES_TUNABLE in tunables else "default"


def default_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without what :func:`environment_for` and :func:`restart_with_host_memory`
    add (tcmalloc's preload and settings, the huge-pages tunable, :data:`SOURCE_VARIABLE`),
    for a child process measured as it runs out of the box. A tcmalloc setting of the
    user's own (a value other than :data:`TCMALLOC_SETTINGS`') is kept."""
    environ = {
        key: value
        for key, value in environ.items()
        if key != SOURCE_VARIABLE and TCMALLOC_SETTINGS.get(key) != value
    }
    preloads = [entry for entry in _preloads(environ) if "tcmalloc" not in entry]
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    tunables = [t for t in tunables if t != HUGE_PAGES_TUNABLE]
    for variable, entries, separator in (
        ("LD_PRELOAD", preloads, " "),
        ("GLIBC_TUNABLES", tunables, ":"),
    ):
        environ.pop(variable, None)
        if entries:
            environ[variable] = separator.join(entries)
    return environ


def restart_with_host_memory(program_file: str) -> None:
    """Starts this program again in its host memory mode (:func:`resolved_mode`) where
    its environment lacks it; otherwise returns. Call it first in a program's
    ``__main__`` block, before any work, with the program's ``__file__`` (the process is
    replaced: same interpreter, arguments and environment plus the mode's variables and
    :data:`SOURCE_VARIABLE`).
    Nothing happens unless the process was started as that program (``sys.argv[0]``),
    so running its module inside another program (``runpy`` in a notebook) never
    replaces that process. A bad :data:`MODE_VARIABLE` stops the program with an
    error naming the allowed values."""
    if os.path.realpath(sys.argv[0]) != os.path.realpath(program_file):
        return
    try:
        mode, source = resolve()
    except ValueError as err:
        sys.exit(f"error: {err}")
    environ = environment_for(mode, os.environ)
    if environ == dict(os.environ):
        return
    environ[SOURCE_VARIABLE] = source
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def mode_source(environ: Mapping[str, str] = os.environ) -> str:
    """How the mode of a process with ``environ`` (:func:`active_mode`) was chosen, one
    of :data:`SOURCES`: :data:`SOURCE_VARIABLE` where a restart set it, else
    :func:`resolve`'s source where the process runs in the mode it resolves to, else
    ``environment`` (it runs as it was started)."""
    if environ.get(SOURCE_VARIABLE) in SOURCES:
        return environ[SOURCE_VARIABLE]
    try:
        mode, source = resolve(environ)
    except ValueError:
        return "environment"
    return source if mode == active_mode(environ) else "environment"
