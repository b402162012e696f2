"""The memory-map budget of a process that holds many compiled programs (Linux).

XLA:CPU loads every kernel of a compiled program as an object of its own, placed in
three small memory maps (code, read-only data, data: 4-12 KiB each), and keeps them
until the executable is freed. Linux caps a process's memory maps at
``vm.max_map_count`` (65,530 by default). A compile that needs more fails inside LLVM
("LLVM compilation error: Cannot allocate memory") and the process dies of a
segmentation fault in the unwinder, without a Python error. A PreResNet-101 ImageNet
train-step program adds 880 to 1,150 maps, so one process reached the cap at its 68th
of 69 instances; a ResNet-18 CIFAR program adds about 600 (``benchmarks/README.md``,
"Compilation").

:class:`MapBudget` tells how many maps the process holds, how many the next compile
is expected to add (the most any compile has added so far, times
:data:`ESTIMATE_MARGIN`, at least :data:`FIRST_PROGRAM_MAPS`), and how far over the cap
that would go with :data:`RESERVE` maps kept for everything else (thread stacks,
buffers, libraries). Every compile of a program that the process keeps runs inside
:meth:`MapBudget.compiling`: first the least recently used programs of the registered
holders (:class:`sdpoint_jax.training.programs.InstancePrograms`, over all of them)
are freed until it fits, and where nothing is left to free it raises
:class:`MemoryMapLimitError`. Freed programs compile again when next used. Evaluation
and calibration (:func:`sdpoint_jax.evaluation.evaluate.evaluate_instances`,
:func:`sdpoint_jax.evaluation.calibrate.calibrate`) make the first call of each
program inside the budget too (:class:`FirstCalls`), so train-step programs make room
for them, and the server compiles all of its programs inside it.

Measured (``benchmarks/README.md``): filling a process's maps to the cap and then
compiling reproduces the crash; a freed program gives its maps back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import threading
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Protocol

from sdpoint_jax.errors import MemoryMapLimitError

MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")
PROCESS_MAPS = Path("/proc/self/maps")
RESERVE = 2048
"""Maps kept free for what is not a compiled program."""
FIRST_PROGRAM_MAPS = 1500
"""Expected maps of a compile before any was measured (the largest program measured,
PreResNet-101 ImageNet, added up to 1,150)."""
ESTIMATE_MARGIN = 1.25
"""The next compile is expected to add up to this many times the most seen so far."""


def process_map_count() -> int:
    """Memory maps this process holds now (lines of ``/proc/self/maps``)."""
    with PROCESS_MAPS.open("rb") as maps:
        return sum(1 for _ in maps)


def system_map_limit() -> int | None:
    """``vm.max_map_count``, or None where the system does not say (not Linux)."""
    try:
        return int(MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return None


class ProgramHolder(Protocol):
    """Something that holds compiled programs and can free them (and compile them
    again when they are next used): :class:`sdpoint_jax.training.programs.InstancePrograms`."""

    def oldest_use(self) -> float | None:
        """When its least recently used program was last used (``time.monotonic``);
        None if it holds none."""

    def free_oldest(self) -> None:
        """Frees its least recently used program."""


@dataclasses.dataclass
class MapBudget:
    """How many more memory maps the process can give to compiled programs.

    Attributes:
      limit: the process's cap (``None``: unknown, the budget never objects).
      count: returns the maps the process holds now.
      reserve: maps kept free for everything that is not a compiled program.
      freed: programs freed so far, over every holder.
    """

    limit: int | None
    count: Callable[[], int] = process_map_count
    reserve: int = RESERVE
    freed: int = 0
    _largest_program: int = 0
    _compiling: int = 0
    _holders: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet, repr=False)
    _lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False)

    def expected_program_maps(self) -> int:
        """Maps the next compile is expected to add (module docstring)."""
        return max(FIRST_PROGRAM_MAPS, int(ESTIMATE_MARGIN * self._largest_program))

    def record(self, added: int) -> None:
        """Notes that a compile added ``added`` maps."""
        with self._lock:
            self._largest_program = max(self._largest_program, added)

    def shortfall(self, compiles: int = 1) -> int:
        """Maps to free before ``compiles`` more programs fit; 0 if they fit."""
        if self.limit is None:
            return 0
        needed = self.count() + compiles * self.expected_program_maps() + self.reserve
        return max(0, needed - self.limit)

    def register(self, holder: ProgramHolder) -> None:
        """Lets the budget free ``holder``'s programs (held weakly)."""
        with self._lock:
            self._holders.add(holder)

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Around one compile: first frees the least recently used programs of every
        registered holder until this compile and the others in flight fit (raising
        :class:`MemoryMapLimitError` when nothing is left to free), then records the
        maps the compile adds (overlapping compiles in other threads count too, which
        only makes the estimate safer)."""
        if self.limit is None:
            yield
            return
        with self._lock:
            self._compiling += 1
            try:
                self._make_room(self._compiling)
            except MemoryMapLimitError:
                self._compiling -= 1
                raise
        try:
            before = self.count()
            yield
            self.record(self.count() - before)
        finally:
            with self._lock:
                self._compiling -= 1

    def _make_room(self, compiles: int) -> None:
        while self.shortfall(compiles) > 0:
            held = [(h.oldest_use(), id(h), h) for h in self._holders]
            held = [entry for entry in held if entry[0] is not None]
            if not held:
                raise self._limit_error(compiles)
            if not self.freed:
                warnings.warn(
                    "freeing the least recently used compiled programs to stay under this "
                    f"process's memory-map cap ({self.limit:,}, vm.max_map_count); they "
                    "compile again when next used. Raise the cap to keep them all.",
                    stacklevel=4,  # the compile site, past contextlib
                )
            min(held)[2].free_oldest()
            self.freed += 1
            gc.collect()  # an executable's maps go with its last reference

    def _limit_error(self, compiles: int = 1) -> MemoryMapLimitError:
        """The error for a compile that does not fit and has nothing left to free."""
        return MemoryMapLimitError(
            f"this process holds {self.count():,} memory maps of the {self.limit:,} that "
            f"Linux allows it (vm.max_map_count), and {compiles} more compiled program(s) "
            f"need about {compiles * self.expected_program_maps():,} more, with "
            f"{self.reserve:,} kept free. XLA:CPU keeps three maps per compiled kernel, "
            "and a compile past the cap kills the process. Raise the cap (`sudo sysctl -w "
            "vm.max_map_count=262144`) or compile fewer programs in one process."
        )


@functools.cache
def process_budget() -> MapBudget:
    """The one budget of this process, shared by all its compiled programs."""
    return MapBudget(system_map_limit())


class FirstCalls:
    """Runs the first call of each key inside a budget: the call that compiles a jitted
    function's program for that key (e.g. ``(instance, input shape)``); later calls run
    as they are.

    Use: ``with first_calls(key): outputs = jitted(..., instance=instance)``. A key is
    counted as compiled only once its first call returned.
    """

    def __init__(self, budget: MapBudget | None = None) -> None:
        self._budget = process_budget() if budget is None else budget
        self._called: set[Hashable] = set()

    @contextlib.contextmanager
    def __call__(self, key: Hashable) -> Iterator[None]:
        if key in self._called:
            yield
            return
        with self._budget.compiling():
            yield
        self._called.add(key)
