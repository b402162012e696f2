"""The HTTP application (``aiohttp.web``) of ``python -m sdpoint_jax.serve``.

Endpoints:

* ``POST /v1/classify``: :mod:`sdpoint_jax.serve.requests` says what it accepts. The
  answer is JSON: ``{"predictions": [[{"class", "probability"}, ... top_k], ...] (one
  list per image), "instance", "gflops" (per image), "top1_error" (the manifest's, or
  null), "latency_ms"}``. A refused request gets its 4xx and ``{"error": message}``;
  a body over ``max_body_bytes`` gets 413.
* ``GET /healthz``: ``{"status": "ok", "input_shape", "max_batch", "slo_ms",
  "instances": [{"name", "gflops", "top1_error"}, ...]}`` (cheapest first).
* ``GET /metrics``: :mod:`sdpoint_jax.serve.metrics`.

The batcher starts with the application and, on shutdown (SIGTERM, SIGINT), serves
the requests already received before it stops.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from aiohttp import web

from sdpoint_jax.serve.batcher import Batcher
from sdpoint_jax.serve.engine import Engine
from sdpoint_jax.serve.metrics import Metrics
from sdpoint_jax.serve.requests import BadRequest, parse_classify

ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
BATCHER = web.AppKey("batcher", Batcher)
PINNED = web.AppKey("pinned", str)
SLO_MS = web.AppKey("slo_ms", float)


def _top_k(probs: np.ndarray, k: int) -> list[list[dict[str, float]]]:
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [
        [{"class": int(c), "probability": float(row[c])} for c in classes]
        for row, classes in zip(probs, order, strict=True)
    ]


def _refuse(metrics: Metrics, status: int, kind: str, message: str) -> web.Response:
    metrics.requests.labels(str(status)).inc()
    metrics.errors.labels(kind).inc()
    return web.json_response({"error": message}, status=status)


async def classify(request: web.Request) -> web.Response:
    app = request.app
    engine, metrics = app[ENGINE], app[METRICS]
    received = time.perf_counter()
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        return _refuse(metrics, 413, "too_large", err.text or "request body too large")
    try:
        checked = parse_classify(
            body,
            request.content_type if body else "",
            request.query,
            input_shape=engine.input_shape,
            levels=engine.levels,
            max_batch=engine.max_batch,
            pinned=app[PINNED],
        )
    except BadRequest as err:
        return _refuse(metrics, err.status, err.kind, str(err))
    try:
        served = await app[BATCHER].submit(checked.images, checked.allowed, received)
    except RuntimeError as err:
        return _refuse(metrics, 503, "internal", str(err))
    except Exception as err:  # a failed batch: the request is answered, the server stays
        return _refuse(metrics, 500, "internal", f"inference failed: {err}")
    latency = time.perf_counter() - received
    metrics.latency.observe(latency)
    metrics.requests.labels("200").inc()
    return web.json_response(
        {
            "predictions": _top_k(served.probs, checked.top_k),
            "instance": served.level.name,
            "gflops": served.level.gflops,
            "top1_error": served.level.top1_error,
            "latency_ms": 1e3 * latency,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response(
        {
            "status": "ok",
            "input_shape": list(engine.input_shape),
            "max_batch": engine.max_batch,
            "slo_ms": request.app[SLO_MS],
            "instances": [dataclasses.asdict(level) for level in engine.levels],
        }
    )


async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    response = web.Response(body=metrics.text())
    response.content_type = "text/plain"
    response.charset = "utf-8"
    return response


def create_app(
    engine: Engine,
    *,
    slo_ms: float,
    max_wait_ms: float,
    max_body_bytes: int,
    pinned: str | None = None,
) -> web.Application:
    """The application serving ``engine``; ``pinned``: serve only that instance."""
    app = web.Application(client_max_size=max_body_bytes)
    app[ENGINE] = engine
    app[METRICS] = Metrics([level.name for level in engine.levels], engine.max_batch)
    app[PINNED] = pinned
    app[SLO_MS] = slo_ms

    async def batching(app: web.Application):
        app[BATCHER] = Batcher(engine, app[METRICS], slo_ms=slo_ms, max_wait_ms=max_wait_ms)
        yield
        await app[BATCHER].close()

    async def drain(app: web.Application) -> None:
        app[BATCHER].drain()

    app.cleanup_ctx.append(batching)
    app.on_shutdown.append(drain)
    app.router.add_post("/v1/classify", classify)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
