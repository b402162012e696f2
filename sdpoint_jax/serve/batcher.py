"""Dynamic batching: requests wait at most ``max_wait_ms`` to share a batch.

Requests queue in arrival order. The oldest request opens a batch; it collects the
requests behind it that may be served by the same instances, up to ``max_batch``
images, until it is full or the oldest has waited ``max_wait_ms``. The controller
(:func:`sdpoint_jax.serve.controller.choose`) then picks the instance among those the
requests allow, the batch is padded to its power-of-two bucket and runs on a worker
thread (the event loop keeps accepting requests meanwhile), and each request gets its
rows. One batch runs at a time. :meth:`Batcher.close` serves every request already
queued, then stops.

The controller plans with the arrival rate (the images submitted over the last
``ARRIVAL_WINDOW_S`` seconds, divided by that window) and with the latency table scaled
by how much slower recent batches ran than it says
(:class:`sdpoint_jax.serve.controller.Slowdown`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import time

import numpy as np

from sdpoint_jax.serve.controller import Level, Slowdown, bucket_size, choose
from sdpoint_jax.serve.engine import Engine
from sdpoint_jax.serve.metrics import Metrics

ARRIVAL_WINDOW_S = 1.0


@dataclasses.dataclass
class Served:
    """A request's answer: probabilities ``(n, classes)`` and the level that ran."""

    probs: np.ndarray
    level: Level


@dataclasses.dataclass
class _Pending:
    images: np.ndarray
    allowed: tuple[str, ...]
    arrived: float
    future: asyncio.Future


class Batcher:
    """Batches requests for ``engine`` under the latency target ``slo_ms``."""

    def __init__(
        self, engine: Engine, metrics: Metrics, *, slo_ms: float, max_wait_ms: float
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.slo_ms = slo_ms
        self.max_wait_s = max_wait_ms / 1e3
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrival = asyncio.Event()
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._last_choice: str | None = None
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque()
        self._slowdown = Slowdown()

    @property
    def queued_images(self) -> int:
        return sum(len(pending.images) for pending in self._queue)

    async def submit(self, images: np.ndarray, allowed: tuple[str, ...], received: float) -> Served:
        """Queues ``images`` ``(n, H, W, 3)``, servable by the instances ``allowed``,
        of a request received at ``received`` (``time.perf_counter()``): its wait, for
        the controller, includes the time spent reading and checking it."""
        if self._closing:
            raise RuntimeError("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(images, allowed, received, future))
        self._arrivals.append((received, len(images)))
        self.metrics.queue_depth.set(self.queued_images)
        self._arrival.set()
        return await future

    def drain(self) -> None:
        """Takes no more requests and serves those queued without waiting for batches
        to fill."""
        self._closing = True
        self._arrival.set()

    async def close(self) -> None:
        """Serves what is queued, then stops the batching task."""
        self.drain()
        await self._task
        self._executor.shutdown()

    def _arriving_per_ms(self) -> float:
        """Images submitted per millisecond over the last ``ARRIVAL_WINDOW_S``."""
        since = time.perf_counter() - ARRIVAL_WINDOW_S
        while self._arrivals and self._arrivals[0][0] < since:
            self._arrivals.popleft()
        return sum(n for _, n in self._arrivals) / (1e3 * ARRIVAL_WINDOW_S)

    async def _wait_for_arrival(self, timeout: float | None) -> None:
        self._arrival.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrival.wait(), timeout)

    def _batch(self, head: _Pending) -> list[_Pending]:
        """The queued requests that join ``head``'s batch, in order, up to ``max_batch``
        images (removed from the queue)."""
        batch, size = [], 0
        for pending in list(self._queue):
            if pending.allowed == head.allowed and size + len(pending.images) <= (
                self.engine.max_batch
            ):
                batch.append(pending)
                size += len(pending.images)
                self._queue.remove(pending)
        return batch

    def _fillable(self, head: _Pending) -> bool:
        same = sum(len(p.images) for p in self._queue if p.allowed == head.allowed)
        return same < self.engine.max_batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue or not self._closing:
            if not self._queue:
                await self._wait_for_arrival(None)
                continue
            head = self._queue[0]
            while not self._closing and self._fillable(head):
                left = head.arrived + self.max_wait_s - time.perf_counter()
                if left <= 0:
                    break
                await self._wait_for_arrival(left)
            batch = self._batch(head)
            images = np.concatenate([pending.images for pending in batch])
            bucket = bucket_size(len(images), self.engine.max_batch)
            arriving_per_ms = self._arriving_per_ms()
            self.metrics.arrival_rate.set(1e3 * arriving_per_ms)
            self.metrics.slowdown.set(self._slowdown.factor())
            level = choose(
                [level for level in self.engine.levels if level.name in head.allowed],
                self._slowdown.scale(self.engine.latency_ms, time.perf_counter()),
                bucket=bucket,
                queued=self.queued_images,
                waited_ms=1e3 * (time.perf_counter() - head.arrived),
                slo_ms=self.slo_ms,
                max_batch=self.engine.max_batch,
                arriving_per_ms=arriving_per_ms,
            )
            self.metrics.queue_depth.set(self.queued_images)
            if level.name != self._last_choice:
                print(
                    f"controller: {level.name} from a batch of {len(images)} with "
                    f"{self.queued_images} image(s) queued",
                    flush=True,
                )
                self._last_choice = level.name
            started = time.perf_counter()
            try:
                probs = await loop.run_in_executor(
                    self._executor, self.engine.run, level.name, images, bucket
                )
            except Exception as err:  # answered as a 500 to each request of the batch
                for pending in batch:
                    pending.future.set_exception(err)
                continue
            finished = time.perf_counter()
            self._slowdown.observe(
                level.name,
                self.engine.latency_ms[level.name, bucket],
                1e3 * (finished - started),
                finished,
            )
            self.metrics.served(level.name, len(images))
            start = 0
            for pending in batch:
                rows = probs[start : start + len(pending.images)]
                start += len(pending.images)
                if not pending.future.done():
                    pending.future.set_result(Served(rows, level))
