"""One compiled XLA program per SDPoint instance, compiled lazily or all up front.

Each instance changes feature-map shapes, so each is its own XLA program (as is each
low mode, :mod:`sdpoint_jax.core.lowmode`: programs are keyed by any hashable static
value, see :data:`sdpoint_jax.training.loop.ProgramKey`). Programs
are compiled ahead of time (``jit(...).lower(...).compile()``) from abstract
arguments, so compiling does not need real data, several can compile in parallel
threads (XLA compiles outside the GIL), and JAX's persistent compilation cache lets a
second run skip XLA's compilation.

JAX's cache is keyed by the lowered program, so a second run still traces and lowers
every program in Python first (the bulk of a warm start for a large model;
``benchmarks/README.md``, "Compilation"). An :class:`ExecutableCache` keeps the
compiled executables themselves, keyed by a fingerprint of everything that determines
them, so a hit skips tracing, lowering and compiling: the executable is read and
loaded. It only keeps programs XLA compiled in this process: an executable that JAX's
cache loaded is not serialised again, since XLA:CPU then writes it without its machine
code (loading that file later fails with "Function ... not found").

Compiled programs hold memory maps, which Linux caps per process; the programs are kept
within :func:`sdpoint_jax.xla_cpu.memory_maps.process_budget`, least recently used
freed first (see :class:`InstancePrograms`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax.experimental import serialize_executable
from tqdm.auto import tqdm

from sdpoint_jax.cache_dir import cache_dir
from sdpoint_jax.xla_cpu.memory_maps import MapBudget, process_budget

DEFAULT_CACHE_DIR = cache_dir()


def default_compile_workers(cap: int = 8) -> int:
    """Compile threads to use by default: one per CPU this process may run on, at most
    ``cap``. More threads than cores only add contention: loading kept programs gets
    slower past one thread per core (``benchmarks/README.md``, "Compilation")."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cap, cpus or 1))


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in ``directory`` (default
    ``~/.cache/sdpoint_jax/xla``), caching every program however fast it compiled;
    :func:`executable_cache` then keeps executables in ``<directory>-executables``."""
    path = Path(directory) if directory else DEFAULT_CACHE_DIR / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


_PERSISTENT_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_compile_record = threading.local()


def _note_persistent_cache_hit(event: str, **_: Any) -> None:
    if event == _PERSISTENT_CACHE_HIT:
        _compile_record.persistent_cache_hit = True


jax.monitoring.register_event_listener(_note_persistent_cache_hit)


def _compile(function: Any, example_args: tuple) -> tuple[Any, bool]:
    """``function.lower(*example_args).compile()`` and whether JAX's persistent
    compilation cache supplied the executable (counted in this thread only, so
    parallel compiles do not mix)."""
    _compile_record.persistent_cache_hit = False
    compiled = function.lower(*example_args).compile()
    return compiled, _compile_record.persistent_cache_hit


@functools.cache
def _source_digest() -> str:
    """SHA-256 over this package's Python sources: a code change is a new program."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def host_description() -> tuple[str, ...]:
    """What an executable is compiled for, as it goes into its cache key: JAX/jaxlib
    versions, backend, devices, the number of processes, the ``XLA_FLAGS`` the backend
    started with (optimisation level, code generation and device-count flags change
    the executable) and, on CPU, the instruction-set flags (an executable compiled for
    one CPU may use instructions another lacks)."""
    devices = jax.devices()  # starts the backend, which reads XLA_FLAGS once
    backend = devices[0].client
    parts = [
        jax.__version__,
        jaxlib.__version__,
        backend.platform,
        backend.platform_version,
        ";".join(f"{d.id}:{d.device_kind}" for d in devices),
        str(jax.process_count()),
        os.environ.get("XLA_FLAGS", ""),
    ]
    cpuinfo = Path("/proc/cpuinfo")
    if backend.platform == "cpu" and cpuinfo.is_file():
        flags = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")]
        parts.append(flags[0] if flags else "")
    return tuple(parts)


class ExecutableCache:
    """Compiled programs serialised in ``directory``, one file per program.

    A program's file name is a SHA-256 over ``fingerprint`` (what the caller's programs
    depend on: model, optimizer, configuration), the program's key, the abstract
    arguments (shapes, dtypes, shardings, tree structure), this package's sources and
    the machine (:func:`host_description`). Any change gives a new name, never a stale
    program. Files are written atomically (temporary file, then rename); a file that
    cannot be read is compiled again and replaced. Only use directories you trust:
    loading an executable runs what it contains.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fingerprint = fingerprint

    def path(self, key: Hashable, example_args: tuple) -> Path:
        """The file of program ``key`` compiled for ``example_args``."""
        leaves, treedef = jax.tree.flatten(example_args)
        avals = [
            (leaf.shape, str(leaf.dtype), str(getattr(leaf, "sharding", None))) for leaf in leaves
        ]
        text = "\n".join(
            [
                self._fingerprint,
                repr(key),
                str(treedef),
                repr(avals),
                _source_digest(),
                *host_description(),
            ]
        )
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()}.executable"

    def load(self, path: Path) -> Any | None:
        """The executable in ``path``, or None if there is none or it cannot be loaded."""
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except FileNotFoundError:
            return None
        except Exception as err:  # a truncated or foreign file: compile again
            print(f"ignoring unreadable cached executable {path.name}: {err}")
            return None

    def store(self, path: Path, compiled: Any) -> None:
        """Writes ``compiled`` to ``path`` atomically (skipped when the backend cannot
        serialise executables)."""
        try:
            data = pickle.dumps(serialize_executable.serialize(compiled))
        except (ValueError, NotImplementedError):
            return
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as file:
            file.write(data)
        os.replace(file.name, path)


def executable_cache(fingerprint: str) -> ExecutableCache | None:
    """An :class:`ExecutableCache` beside the persistent compilation cache
    (``<jax_compilation_cache_dir>-executables``), or None while that cache is off and
    in multi-process runs (whose executables span hosts)."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory or not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
        return None
    directory = Path(directory)
    return ExecutableCache(directory.with_name(directory.name + "-executables"), fingerprint)


class InstancePrograms:
    """Compiled ``build(key)`` programs for abstract ``example_args``, one per key (an
    SDPoint instance, or any other hashable static setting such as a low mode).

    Args:
      build: returns the ``jax.jit``-wrapped function of one key (with its
        shardings and donation).
      example_args: ``jax.ShapeDtypeStruct`` pytrees (with shardings) of the arguments,
        the same for every key; or a function of the key returning them.
      name: used in progress output.
      executables: where compiled programs are kept across runs (None: nowhere).
      map_budget: the memory maps this process can give to compiled programs (default:
        :func:`sdpoint_jax.xla_cpu.memory_maps.process_budget`). Before a compile that
        would not fit, the least recently used programs are freed (and compile again
        when next used); with none left to free, it raises
        :class:`~sdpoint_jax.xla_cpu.memory_maps.MemoryMapLimitError` rather than let
        XLA crash the process.
    """

    def __init__(
        self,
        build: Callable[[Hashable], Any],
        example_args: tuple | Callable[[Hashable], tuple],
        name: str,
        executables: ExecutableCache | None = None,
        map_budget: MapBudget | None = None,
    ):
        self._build = build
        self._example_args = example_args if callable(example_args) else lambda key: example_args
        self._name = name
        self._executables = executables
        self._map_budget = process_budget() if map_budget is None else map_budget
        self._compiled: dict[Hashable, Any] = {}  # least recently used first
        self._last_use: dict[Hashable, float] = {}
        self._freed = 0
        self._lock = threading.Lock()
        self._map_budget.register(self)

    @property
    def freed(self) -> int:
        """Programs freed so far to stay within the memory-map budget."""
        return self._freed

    def oldest_use(self) -> float | None:
        """When the least recently used program was last used (``time.monotonic``)."""
        with self._lock:
            return self._last_use[next(iter(self._compiled))] if self._compiled else None

    def free_oldest(self) -> None:
        """Frees the least recently used program (compiled again when next used)."""
        with self._lock:
            if self._compiled:
                key = next(iter(self._compiled))
                del self._compiled[key], self._last_use[key]
                self._freed += 1

    def _compile(self, key: Hashable) -> Any:
        with self._map_budget.compiling():
            return self._compile_unbudgeted(key)

    def _compile_unbudgeted(self, key: Hashable) -> Any:
        example_args = self._example_args(key)
        if self._executables is None:
            return _compile(self._build(key), example_args)[0]
        path = self._executables.path(key, example_args)
        compiled = self._executables.load(path)
        if compiled is None:
            compiled, from_persistent_cache = _compile(self._build(key), example_args)
            if not from_persistent_cache:
                self._executables.store(path, compiled)
        return compiled

    def trace(self, key: Hashable) -> jax.stages.Traced:
        """Program ``key`` traced, not compiled: ``.lower(lowering_platforms=("tpu",))``
        lowers it for a platform that need not be this machine's (what a run there
        compiles)."""
        return self._build(key).trace(*self._example_args(key))

    def __getitem__(self, key: Hashable) -> Any:
        with self._lock:
            compiled = self._compiled.pop(key, None)
            if compiled is not None:
                self._compiled[key] = compiled  # now the most recently used
                self._last_use[key] = time.monotonic()
        if compiled is None:
            compiled = self._compile(key)
            with self._lock:
                compiled = self._held(key, compiled)
        return compiled

    def _held(self, key: Hashable, compiled: Any) -> Any:
        """Holds ``compiled`` as ``key``'s program unless another thread got there
        first; returns the one held. Call with the lock held."""
        self._last_use[key] = time.monotonic()
        return self._compiled.setdefault(key, compiled)

    def __len__(self) -> int:
        """Programs held now (compiled, and not freed for the memory-map budget)."""
        return len(self._compiled)

    def precompile(self, keys: Iterable[Hashable], *, workers: int | None = None) -> None:
        """Compiles every key's program not compiled yet, ``workers`` at a time
        (default: :func:`default_compile_workers`)."""
        workers = default_compile_workers() if workers is None else workers
        todo = [key for key in dict.fromkeys(keys) if key not in self._compiled]
        if not todo:
            return
        with (
            concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(
                total=len(todo),
                desc=f"compiling {self._name}",
                unit="program",
                disable=jax.process_index() != 0,  # one bar per job
            ) as bar,
        ):
            futures = {pool.submit(self._compile, key): key for key in todo}
            for future in concurrent.futures.as_completed(futures):
                with self._lock:
                    self._held(futures[future], future.result())
                bar.update()
