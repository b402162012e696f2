"""The latency-target controller: which exported instance serves the next batch.

For a batch padded to ``bucket`` images, the requests in it have already waited
``waited_ms`` (the oldest of them) and ``queued`` more images wait behind it. Serving
it with instance ``i`` is predicted to finish the batch's oldest request after
``waited_ms + L(i, bucket)`` and the queue behind it (served next, with the same
instance, in batches of at most ``max_batch``) after that plus the latency of those
batches. The controller takes the most accurate instance (lowest top-1 error from the
export's manifest; where the manifest has no errors, the costlier instance counts as
the more accurate) whose predicted time of both is within the latency target
``slo_ms``; if none is, the one that empties the queue soonest. ``L(i, b)`` is a tail
latency (90th percentile) of one batch of ``b`` images, from ``latency.json`` or
measured at start-up.

Requests keep arriving while the chosen instance runs, at ``arriving_per_ms`` images
per millisecond. The ``n_1 = round(arriving_per_ms * D_0)`` images that arrive during
the ``D_0`` ms it takes to serve this batch and the queue form the next round: the first
of them waits up to ``D_0`` and then the ``D_1`` ms that the same instance takes to
serve all ``n_1``; during ``D_1`` another ``n_2`` arrive, and so on. An instance also
needs ``D_k + D_(k+1)`` within the target for the next ``LOOKAHEAD_ROUNDS`` rounds
(stopping early once a round receives no image). An instance that cannot keep up with
the arrivals fails this, because its rounds grow, even where it serves the batch in hand
in time. So under light load the most accurate instance serves; as the load grows
cheaper instances do, and the most accurate one again once it falls.

Under load the programs run slower than when they were timed alone (request handling
and the clients share the cores), and a table measured at start-up on a busy machine
can be off for one instance: :class:`Slowdown` tracks the median ratio of measured to
tabled batch latency over recent batches, per instance, and the server scales the
table by it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

LOOKAHEAD_ROUNDS = 8
RECENT_BATCHES = 32
RECENT_S = 10.0
OWN_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class Level:
    """One exported instance the controller may choose: ``name`` (``"full"``,
    ``"P:R"``), ``gflops`` per image and ``top1_error`` (%, ``None`` if unknown)."""

    name: str
    gflops: float
    top1_error: float | None


class Slowdown:
    """How much slower each instance's batches run now than the latency table says.

    An instance's factor is the median of ``measured / tabled`` over its batches of the
    last ``RECENT_S`` seconds (at most ``RECENT_BATCHES``), once it has at least
    ``OWN_BATCHES`` of them; otherwise the median over the last ``RECENT_BATCHES``
    batches of any instance; 1 before any batch. The first corrects a table entry
    measured badly at start-up, the second the load that every program shares.
    """

    def __init__(self) -> None:
        self._any: collections.deque[float] = collections.deque(maxlen=RECENT_BATCHES)
        self._own: dict[str, collections.deque[tuple[float, float]]] = {}

    def observe(self, name: str, tabled_ms: float, measured_ms: float, at: float) -> None:
        """Records one batch of instance ``name`` that the table put at ``tabled_ms``
        and that took ``measured_ms``, finishing at time ``at`` (seconds)."""
        if not tabled_ms > 0:
            raise ValueError(f"tabled latency must be > 0 ms, got {tabled_ms}")
        ratio = measured_ms / tabled_ms
        self._any.append(ratio)
        own = self._own.setdefault(name, collections.deque(maxlen=RECENT_BATCHES))
        own.append((at, ratio))

    def factor(self, name: str | None = None, now: float | None = None) -> float:
        """Instance ``name``'s factor at time ``now`` (class docstring); without
        ``name``, the factor over every instance."""
        if name is not None and now is not None:
            own = [ratio for at, ratio in self._own.get(name, ()) if at >= now - RECENT_S]
            if len(own) >= OWN_BATCHES:
                return float(np.median(own))
        return float(np.median(self._any)) if self._any else 1.0

    def scale(
        self, latency_ms: Mapping[tuple[str, int], float], now: float
    ) -> dict[tuple[str, int], float]:
        """``latency_ms`` with each instance's entries multiplied by its factor."""
        factors = {name: self.factor(name, now) for name, _ in latency_ms}
        return {(name, batch): factors[name] * ms for (name, batch), ms in latency_ms.items()}


def bucket_size(images: int, max_batch: int) -> int:
    """The batch size ``images`` run at: the next power of two, at most ``max_batch``
    (itself a power of two)."""
    if not 1 <= images <= max_batch:
        raise ValueError(f"images must lie in [1, {max_batch}], got {images}")
    return 1 << (images - 1).bit_length()


def buckets(max_batch: int) -> tuple[int, ...]:
    """Every batch size a server of ``max_batch`` compiles: ``1, 2, 4, ..., max_batch``."""
    if max_batch < 1 or max_batch & (max_batch - 1):
        raise ValueError(f"max batch must be a power of two >= 1, got {max_batch}")
    return tuple(1 << k for k in range(max_batch.bit_length()))


def by_accuracy(levels: Sequence[Level]) -> list[Level]:
    """``levels``, most accurate first: by top-1 error where every level has one, else
    by GFLOPs (costlier first)."""
    if all(level.top1_error is not None for level in levels):
        return sorted(levels, key=lambda level: (level.top1_error, -level.gflops))
    return sorted(levels, key=lambda level: -level.gflops)


def predicted_ms(
    latency_ms: Mapping[tuple[str, int], float],
    name: str,
    bucket: int,
    queued: int,
    max_batch: int,
) -> float:
    """Milliseconds from now until instance ``name`` has served this batch and the
    ``queued`` images behind it (in batches of ``max_batch``, the last one bucketed)."""
    total = latency_ms[name, bucket]
    full_batches, rest = divmod(queued, max_batch)
    total += full_batches * latency_ms[name, max_batch]
    if rest:
        total += latency_ms[name, bucket_size(rest, max_batch)]
    return total


def choose(
    levels: Sequence[Level],
    latency_ms: Mapping[tuple[str, int], float],
    *,
    bucket: int,
    queued: int,
    waited_ms: float,
    slo_ms: float,
    max_batch: int,
    arriving_per_ms: float = 0.0,
) -> Level:
    """The level that serves the next batch (module docstring).

    Args:
      levels: the candidates (at least one).
      latency_ms: ``{(name, batch size): tail latency of one batch in ms}`` for every
        candidate and every bucket.
      bucket: this batch's padded size.
      queued: images waiting behind this batch.
      waited_ms: how long the oldest request of this batch has waited.
      slo_ms: the latency target.
      max_batch: the largest batch.
      arriving_per_ms: the rate at which images arrive, per millisecond (0: no
        look-ahead).
    """
    if not levels:
        raise ValueError("the controller needs at least one instance to choose from")
    if arriving_per_ms < 0:
        raise ValueError(f"arriving_per_ms must be >= 0, got {arriving_per_ms}")
    for level in by_accuracy(levels):
        drain_ms = predicted_ms(latency_ms, level.name, bucket, queued, max_batch)
        if waited_ms + drain_ms <= slo_ms and _keeps_up(
            latency_ms, level.name, drain_ms, arriving_per_ms, slo_ms, max_batch
        ):
            return level
    return min(
        levels, key=lambda level: predicted_ms(latency_ms, level.name, bucket, queued, max_batch)
    )


def _keeps_up(
    latency_ms: Mapping[tuple[str, int], float],
    name: str,
    drain_ms: float,
    arriving_per_ms: float,
    slo_ms: float,
    max_batch: int,
) -> bool:
    """Whether instance ``name`` serves each of the next ``LOOKAHEAD_ROUNDS`` rounds of
    arrivals within ``slo_ms`` of the start of the round before (module docstring),
    the first round arriving during the ``drain_ms`` of the batch in hand."""
    previous_ms = drain_ms
    for _ in range(LOOKAHEAD_ROUNDS):
        arriving = round(arriving_per_ms * previous_ms)
        if not arriving:
            return True
        round_ms = predicted_ms(
            latency_ms,
            name,
            bucket_size(min(arriving, max_batch), max_batch),
            max(arriving - max_batch, 0),
            max_batch,
        )
        if previous_ms + round_ms > slo_ms:
            return False
        previous_ms = round_ms
    return True
