"""The project's cache directory (compilation caches, the host memory record)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sdpoint_jax``, else ``~/.cache/sdpoint_jax``, read from the
    environment when called."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdpoint_jax"
