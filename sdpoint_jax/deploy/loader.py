"""Runs exported SDPoint instances without the model code (only ``jax`` and ``numpy``).

:mod:`sdpoint_jax.deploy.artifacts` writes a directory::

    manifest.json              what was exported (see sdpoint_jax.deploy.artifacts)
    <instance key>.jaxexport   one serialised jax.export function per instance
    switchable.jaxexport       one function (images, level) over all of them

Each function maps images ``(B, H, W, 3)`` float32 RGB in 0-255 pixel units (any
batch size ``B``; normalisation is inside the function) to float32 logits
``(B, num_classes)``. Files are deserialised the first time they are used.

    exported = load_exported("runs/quick/export")
    exported.instances                          # names, cheapest first
    logits = exported.logits(images, "3:0.5")   # one instance
    logits = exported.logits_at_level(images, 0)  # the switchable function, level 0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

MANIFEST = "manifest.json"
FORMAT = "sdpoint_jax.deploy.artifacts/1"


class ExportedModel:
    """The instances exported into one directory (see :func:`load_exported`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no exported model in {self.directory}: {path} does not exist (write one "
                f"with `python -m sdpoint_jax.export --workdir RUN --out {self.directory}`)"
            )
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(
                f"{path} has format {self.manifest.get('format')!r}; this loader reads {FORMAT!r}"
            )
        self._entries = {entry["name"]: entry for entry in self.manifest["instances"]}
        self._loaded: dict[str, jax.export.Exported] = {}

    @property
    def instances(self) -> tuple[str, ...]:
        """Exported instance names (``"full"``, ``"P:R"``), cheapest first: the levels
        of :meth:`logits_at_level`."""
        return tuple(self._entries)

    def gflops(self, instance: str) -> float:
        """Forward GFLOPs per image of ``instance``."""
        return self._entry(instance)["gflops"]

    def function(self, instance: str) -> jax.export.Exported:
        """The deserialised function of ``instance``: ``images (B, H, W, 3)`` -> logits,
        for callers that compile it themselves (``jax.jit(f.call)``)."""
        return self._function(self._entry(instance)["file"])

    def logits(self, images: Any, instance: str) -> np.ndarray:
        """Logits ``(B, num_classes)`` of ``instance`` for ``images`` ``(B, H, W, 3)``
        (0-255 RGB)."""
        entry = self._entry(instance)
        return np.asarray(self._function(entry["file"]).call(self._check(images)))

    def logits_at_level(self, images: Any, level: int) -> np.ndarray:
        """Logits from the switchable function: ``level`` picks ``instances[level]``
        at run time (``lax.switch``), one program for every level."""
        if isinstance(level, bool) or not isinstance(level, int | np.integer):
            raise TypeError(f"level must be an integer, got {level!r}")
        if not 0 <= level < len(self._entries):
            raise ValueError(
                f"level {level} is out of range: this export has levels 0..{len(self._entries) - 1}"
                f" ({', '.join(self.instances)})"
            )
        function = self._function(self.manifest["switchable"]["file"])
        return np.asarray(function.call(self._check(images), np.int32(level)))

    def _entry(self, instance: str) -> dict[str, Any]:
        if instance not in self._entries:
            raise ValueError(
                f"instance {instance!r} was not exported; this export has {list(self.instances)}"
            )
        return self._entries[instance]

    def _check(self, images: Any) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        expected = tuple(self.manifest["input"]["shape"][1:])
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"images must be (batch, {', '.join(map(str, expected))}) RGB in 0-255, "
                f"got shape {images.shape}"
            )
        return images

    def _function(self, file: str) -> jax.export.Exported:
        if file not in self._loaded:
            self._loaded[file] = jax.export.deserialize(
                bytearray((self.directory / file).read_bytes())
            )
        return self._loaded[file]


def load_exported(directory: str | Path) -> ExportedModel:
    """The exported model in ``directory`` (written by :mod:`sdpoint_jax.deploy.artifacts`)."""
    return ExportedModel(directory)
