"""What machine a process runs on: CPU model, kernel release, C library. Reads files
and ``platform`` only (nothing heavy), so it serves programs before JAX loads."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, as ``lscpu`` shows it),
    or the platform's processor string where there is none."""
    if CPUINFO.is_file():
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def glibc_version() -> str:
    """The glibc version this Python runs on (e.g. ``"2.36"``), ``""`` for another C
    library."""
    library, version = platform.libc_ver()
    return version if library == "glibc" else ""


def identity() -> dict[str, str]:
    """``cpu_model``, ``kernel_release`` (``uname -r``) and ``glibc``
    (:func:`glibc_version`): what a choice measured on this machine holds for."""
    return {
        "cpu_model": cpu_model(),
        "kernel_release": platform.release(),
        "glibc": glibc_version(),
    }
