"""The server's Prometheus metrics (``GET /metrics``, text format, ``prometheus_client``).

Each server has a registry of its own (several may run in one process):

* ``sdpoint_requests_total{status}``: answered ``/v1/classify`` requests by status;
* ``sdpoint_errors_total{kind}``: refused or failed requests by kind (``bad_request``,
  ``unknown_instance``, ``media_type``, ``too_large``, ``internal``);
* ``sdpoint_request_latency_seconds``: time from receipt to answer of a classification;
* ``sdpoint_batch_size``: images in each batch run (before padding);
* ``sdpoint_batches_total{instance}`` and ``sdpoint_images_total{instance}``: what
  the controller chose, and ``sdpoint_instance_chosen{instance}`` (1 for the latest
  batch's instance, 0 for the others);
* ``sdpoint_queue_depth``: images waiting for a batch;
* ``sdpoint_arrival_images_per_second``: the arrival rate the controller last planned
  with; ``sdpoint_latency_slowdown``: how much slower than the latency table recent
  batches of any instance ran (:class:`sdpoint_jax.serve.controller.Slowdown`).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The metrics of one server of ``instances`` batching up to ``max_batch``."""

    def __init__(self, instances: Sequence[str], max_batch: int) -> None:
        self.registry = CollectorRegistry()
        registry = {"registry": self.registry}
        self.requests = Counter(
            "sdpoint_requests", "classification requests by status", ["status"], **registry
        )
        self.errors = Counter("sdpoint_errors", "refused or failed requests", ["kind"], **registry)
        self.latency = Histogram(
            "sdpoint_request_latency_seconds",
            "receipt to answer of a classification",
            buckets=LATENCY_BUCKETS,
            **registry,
        )
        self.batch_size = Histogram(
            "sdpoint_batch_size",
            "images per batch run",
            buckets=tuple(1 << k for k in range(max_batch.bit_length())),
            **registry,
        )
        self.batches = Counter("sdpoint_batches", "batches by instance", ["instance"], **registry)
        self.images = Counter("sdpoint_images", "images by instance", ["instance"], **registry)
        self.chosen = Gauge(
            "sdpoint_instance_chosen", "1 for the latest batch's instance", ["instance"], **registry
        )
        self.queue_depth = Gauge("sdpoint_queue_depth", "images waiting for a batch", **registry)
        self.arrival_rate = Gauge(
            "sdpoint_arrival_images_per_second", "arrival rate planned with", **registry
        )
        self.slowdown = Gauge(
            "sdpoint_latency_slowdown", "recent batch latency over the table's", **registry
        )
        self.slowdown.set(1.0)
        self._instances = tuple(instances)
        for name in self._instances:
            self.chosen.labels(name).set(0)

    def served(self, instance: str, images: int) -> None:
        """One batch of ``images`` served by ``instance``."""
        self.batch_size.observe(images)
        self.batches.labels(instance).inc()
        self.images.labels(instance).inc(images)
        for name in self._instances:
            self.chosen.labels(name).set(float(name == instance))

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
