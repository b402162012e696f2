"""What ``POST /v1/classify`` accepts, checked before anything runs.

The body is either

* a NumPy ``.npy`` file (``Content-Type: application/x-npy``, or any body starting
  with the ``.npy`` magic bytes) of a real dtype (``uint8``, ``float32``, ...), options
  in the query string: ``?instance=3:0.5&max_gflops=0.01&top_k=5``; or
* JSON (``Content-Type: application/json``): ``{"images": [...], "instance": ...,
  "max_gflops": ..., "top_k": ...}``, ``images`` a nested array of numbers.

Images are one ``(H, W, 3)`` image or a batch ``(n, H, W, 3)`` of the exported input
shape, RGB in 0-255, with ``1 <= n <= max_batch``. ``instance`` pins an exported
instance; ``max_gflops`` lets the controller choose among those costing at most that;
``top_k`` (default 5) is how many classes to return. Anything else is a
:class:`BadRequest` with its HTTP status and a one-line message naming the bad value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdpoint_jax.serve.controller import Level

NPY_MAGIC = b"\x93NUMPY"
DEFAULT_TOP_K = 5


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = {400: "bad_request", 404: "unknown_instance", 415: "media_type"}.get(
            status, "bad_request"
        )


@dataclasses.dataclass(frozen=True)
class Classify:
    """A checked request: ``images`` float32 ``(n, H, W, 3)``, the names of the
    instances that may serve it (cheapest first) and ``top_k``."""

    images: np.ndarray
    allowed: tuple[str, ...]
    top_k: int


def _decode(body: bytes, content_type: str) -> tuple[Any, dict[str, Any]]:
    """``(images, options)`` of the body, undecoded images as given."""
    if content_type == "application/x-npy" or body.startswith(NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except ValueError as err:
            raise BadRequest(400, f"the body is not a readable .npy array: {err}") from None
        if not isinstance(array, np.ndarray):
            raise BadRequest(400, "the .npy body must hold one array, got an archive")
        return array, {}
    if content_type not in ("application/json", ""):
        raise BadRequest(
            415,
            f"Content-Type {content_type!r} is not accepted: send application/x-npy or "
            f"application/json",
        )
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"malformed JSON: {err}") from None
    if not isinstance(payload, dict) or "images" not in payload:
        raise BadRequest(400, 'the JSON body must be an object with an "images" array')
    try:
        array = np.asarray(payload.pop("images"), dtype=np.float64)
    except (ValueError, TypeError):
        raise BadRequest(
            400, '"images" must be a rectangular nested array of numbers (n, H, W, 3)'
        ) from None
    return array, payload


def _option(options: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = options.get(name, default)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"{name} must be a {kind.__name__}, got {value!r}") from None


def parse_classify(
    body: bytes,
    content_type: str,
    query: Mapping[str, str],
    *,
    input_shape: Sequence[int],
    levels: Sequence[Level],
    max_batch: int,
    pinned: str | None = None,
) -> Classify:
    """Checks a ``/v1/classify`` request (module docstring).

    Args:
      body, content_type, query: the request.
      input_shape: ``(H, W, 3)`` of the export.
      levels: the exported instances, cheapest first.
      max_batch: most images in one request.
      pinned: the server serves only this instance.

    Raises:
      BadRequest: 400 for a wrong shape, dtype, value, option or malformed body, 404
        for an instance that was not exported, 415 for another content type.
    """
    array, options = _decode(body, content_type)
    unknown = sorted(set(options) - {"instance", "max_gflops", "top_k"})
    if unknown:
        raise BadRequest(
            400, f"unknown field(s) {unknown}: allowed are instance, max_gflops, top_k"
        )
    options = {**query, **options}
    if array.dtype.kind not in "uif" or array.dtype == np.float16:
        raise BadRequest(
            400, f"images must be of a real dtype (uint8, float32, ...), got {array.dtype}"
        )
    shape = tuple(input_shape)
    if array.shape == shape:
        array = array[None]
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
        raise BadRequest(
            400,
            f"images must have shape {shape} or (n, {', '.join(map(str, shape))}), "
            f"got {array.shape}",
        )
    if not 1 <= len(array) <= max_batch:
        raise BadRequest(400, f"a request holds 1 to {max_batch} images, got {len(array)}")
    images = array.astype(np.float32)
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255:
        raise BadRequest(400, "pixel values must be finite and within [0, 255]")
    top_k = _option(options, "top_k", int, DEFAULT_TOP_K)
    if top_k < 1:
        raise BadRequest(400, f"top_k must be >= 1, got {top_k}")
    names = [level.name for level in levels]
    instance = _option(options, "instance", str, pinned)
    if instance is not None and instance not in names:
        raise BadRequest(404, f"instance {instance!r} was not exported; this export has {names}")
    if pinned is not None and instance != pinned:
        raise BadRequest(400, f"this server serves only instance {pinned!r}, got {instance!r}")
    allowed = [instance] if instance is not None else names
    max_gflops = _option(options, "max_gflops", float, None)
    if max_gflops is not None:
        cheapest = min(level.gflops for level in levels)
        if not max_gflops >= cheapest:
            raise BadRequest(
                400,
                f"max_gflops must be at least {cheapest:g} (the cheapest instance), "
                f"got {max_gflops}",
            )
        cost = {level.name: level.gflops for level in levels}
        allowed = [name for name in allowed if cost[name] <= max_gflops]
        if not allowed:
            raise BadRequest(400, f"instance {instance!r} costs more than max_gflops={max_gflops}")
    return Classify(images, tuple(allowed), top_k)
