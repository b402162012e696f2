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
measured at start-up. So under light load the full network serves; as the queue grows
cheaper instances do, and the full network again once it drains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Level:
    """One exported instance the controller may choose: ``name`` (``"full"``,
    ``"P:R"``), ``gflops`` per image and ``top1_error`` (%, ``None`` if unknown)."""

    name: str
    gflops: float
    top1_error: float | None


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
    """
    if not levels:
        raise ValueError("the controller needs at least one instance to choose from")
    for level in by_accuracy(levels):
        if waited_ms + predicted_ms(latency_ms, level.name, bucket, queued, max_batch) <= slo_ms:
            return level
    return min(
        levels, key=lambda level: predicted_ms(latency_ms, level.name, bucket, queued, max_batch)
    )
