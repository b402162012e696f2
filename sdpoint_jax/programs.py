"""One compiled XLA program per SDPoint instance, compiled lazily or all up front.

Each instance changes feature-map shapes, so each is its own XLA program (as is each
low mode, :mod:`sdpoint_jax.lowmode`: programs are keyed by any hashable static
value, see :data:`sdpoint_jax.train.ProgramKey`). Programs
are compiled ahead of time (``jit(...).lower(...).compile()``) from abstract
arguments, so compiling does not need real data, several can compile in parallel
threads (XLA compiles outside the GIL), and JAX's persistent compilation cache lets a
second run skip compilation altogether.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdpoint_jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in ``directory`` (default
    ``~/.cache/sdpoint_jax/xla``), caching every program however fast it compiled."""
    path = Path(directory) if directory else DEFAULT_CACHE_DIR / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class InstancePrograms:
    """Compiled ``build(key)`` programs for abstract ``example_args``, one per key (an
    SDPoint instance, or any other hashable static setting such as a low mode).

    Args:
      build: returns the ``jax.jit``-wrapped function of one key (with its
        shardings and donation).
      example_args: ``jax.ShapeDtypeStruct`` pytrees (with shardings) of the arguments.
      name: used in progress output.
    """

    def __init__(self, build: Callable[[Hashable], Any], example_args: tuple, name: str):
        self._build = build
        self._example_args = example_args
        self._name = name
        self._compiled: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def _compile(self, key: Hashable) -> Any:
        return self._build(key).lower(*self._example_args).compile()

    def __getitem__(self, key: Hashable) -> Any:
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(key)
            with self._lock:
                self._compiled.setdefault(key, compiled)
        return self._compiled[key]

    def __len__(self) -> int:
        return len(self._compiled)

    def precompile(self, keys: Iterable[Hashable], *, workers: int = 4) -> None:
        """Compiles every key's program not compiled yet, ``workers`` at a time."""
        todo = [key for key in dict.fromkeys(keys) if key not in self._compiled]
        if not todo:
            return
        with (
            concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(total=len(todo), desc=f"compiling {self._name}", unit="program") as bar,
        ):
            futures = {pool.submit(self._compile, key): key for key in todo}
            for future in concurrent.futures.as_completed(futures):
                with self._lock:
                    self._compiled.setdefault(futures[future], future.result())
                bar.update()
