"""Benchmark output: the device a result was measured on, console tables, JSON files."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from sdpoint_jax import machine
from sdpoint_jax.xla_cpu import host_memory


def environment() -> dict[str, str]:
    """``device_kind``, ``platform`` and ``jax_version`` of this process's first device,
    the host's ``cpu_model`` (:func:`sdpoint_jax.machine.cpu_model`), and the process's
    ``host_memory`` mode (:func:`sdpoint_jax.xla_cpu.host_memory.active_mode`) and how it
    was chosen, ``host_memory_source`` (:func:`~sdpoint_jax.xla_cpu.host_memory.mode_source`)."""
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "cpu_model": machine.cpu_model(),
        "host_memory": host_memory.active_mode(),
        "host_memory_source": host_memory.mode_source(),
    }


def host_line(result: Mapping[str, Any]) -> str:
    """The line above a benchmark's table naming the host: CPU model and host memory
    mode, from a result carrying :func:`environment`."""
    return (
        f"CPU: {result['cpu_model']}; host memory: {result['host_memory']} "
        f"({result['host_memory_source']})"
    )


@dataclasses.dataclass(frozen=True)
class Column:
    """One table column: ``header`` over ``row[key]`` formatted with ``spec``; a missing
    or ``None`` value prints as ``-``."""

    header: str
    key: str
    spec: str = ""

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        return "-" if value is None else format(value, self.spec)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Right-aligned plain-text table, one line per row under a header line."""
    cells = [[column.header for column in columns]]
    cells += [[column.cell(row) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    )


def write_json(path: Path, value: Any) -> Path:
    """Writes ``value`` as indented JSON to ``path`` (creating its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")
    return path


def read_json(path: Path) -> Any:
    """The JSON value of ``path`` (as :func:`write_json` wrote it)."""
    return json.loads(path.read_text())
