"""``python -m sdpoint_jax.serve --export DIR``: an HTTP server of exported SDPoint
instances that holds a latency target under changing load.

It loads the export directory (``python -m sdpoint_jax.export``), compiles every
instance for every power-of-two batch size up to ``--max-batch``, reads or measures
their latencies, and serves ``POST /v1/classify``, ``GET /healthz`` and ``GET
/metrics`` on ``--host:--port`` (:mod:`sdpoint_jax.serve.app`). Requests are batched
dynamically (at most ``--max-wait-ms``); per batch, the controller picks the most
accurate instance that keeps requests within ``--slo-ms``
(:mod:`sdpoint_jax.serve.controller`). SIGTERM serves the requests already received,
then exits 0.
"""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow loads
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=False)

import math
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from sdpoint_jax import cli

HTTP_OVERHEAD_BYTES = 1 << 20
"""Room in the default body limit besides the images themselves (JSON punctuation)."""
JSON_BYTES_PER_VALUE = 8
"""Bytes a pixel value takes in JSON at most (``"255.0, "``), for the default limit."""


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("export", None, "export directory (python -m sdpoint_jax.export)", **define)
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on", **define)
    flags.DEFINE_integer(
        "port", 8000, "port to listen on", lower_bound=0, upper_bound=65535, **define
    )
    flags.DEFINE_float("slo-ms", 50.0, "latency target of a request, ms", lower_bound=0.1, **define)
    flags.DEFINE_integer(
        "max-batch", 64, "largest batch, a power of two", lower_bound=1, upper_bound=4096, **define
    )
    flags.DEFINE_float(
        "max-wait-ms", 5.0, "longest a request waits for a batch to fill", lower_bound=0, **define
    )
    flags.DEFINE_string(
        "latency",
        None,
        "latency.json (bench latency) to read latencies from; else measured",
        **define,
    )
    flags.DEFINE_string(
        "compiler-options",
        None,
        "inference compiler options (xla-default or single-convolution; default "
        "xla-default) of the programs --latency does not list; listed ones use the fastest "
        "set their rows timed",
        **define,
    )
    flags.DEFINE_string("instance", None, "serve only this instance (e.g. 'full')", **define)
    flags.DEFINE_integer(
        "max-body-mb", None, "largest request body, MiB (default: max-batch JSON images)", **define
    )


def serve(flag_values: flags.FlagValues) -> None:
    """Builds the engine (compiling every program), then serves until SIGTERM/SIGINT."""
    from aiohttp import web

    from sdpoint_jax.deploy.loader import load_exported
    from sdpoint_jax.serve.app import create_app
    from sdpoint_jax.serve.controller import buckets
    from sdpoint_jax.serve.engine import ENGINE_OPTION_SET, Engine
    from sdpoint_jax.xla_cpu.compiler_options import check_inference_option_set

    max_batch = flag_values["max-batch"].value
    try:
        buckets(max_batch)
    except ValueError as err:
        raise cli.UsageError(f"--max-batch: {err}") from None
    option_set = flag_values["compiler-options"].value or ENGINE_OPTION_SET
    try:
        check_inference_option_set(option_set)
    except ValueError as err:
        raise cli.UsageError(f"--compiler-options: {err}") from None
    exported = load_exported(Path(flag_values.export))
    pinned = flag_values.instance
    if pinned is not None and pinned not in exported.instances:
        raise ValueError(
            f"--instance {pinned!r} was not exported; {flag_values.export} has "
            f"{list(exported.instances)}"
        )
    print(
        f"compiling {len(exported.instances)} instance(s) for batches up to {max_batch}", flush=True
    )
    engine = Engine(exported, max_batch, latency_file=flag_values.latency, option_set=option_set)
    for key, ms in engine.latency_ms.items():
        name, bucket = key
        print(
            f"latency {name:>8} batch {bucket:>4}: {ms:8.3f} ms "
            f"({engine.latency_source[key]}, {engine.compiler_options[key]})"
        )
    image_values = max_batch * math.prod(engine.input_shape)
    max_body = flag_values["max-body-mb"].value
    body_bytes = (
        max_body << 20
        if max_body is not None
        else image_values * JSON_BYTES_PER_VALUE + HTTP_OVERHEAD_BYTES
    )
    app = create_app(
        engine,
        slo_ms=flag_values["slo-ms"].value,
        max_wait_ms=flag_values["max-wait-ms"].value,
        max_body_bytes=body_bytes,
        pinned=pinned,
    )
    web.run_app(
        app,
        host=flag_values.host,
        port=flag_values.port,
        print=lambda text: print(text, flush=True),
        access_log=None,
        handle_signals=True,
    )


PROGRAM = cli.Program(
    module="sdpoint_jax.serve",
    description=__doc__,
    define_flags=define_flags,
    commands=cli.Command(serve),
    required=("export",),
)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command line ``argv`` (default: this process's, without the program name)."""
    cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
