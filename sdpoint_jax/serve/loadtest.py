"""``python -m sdpoint_jax.serve.loadtest --url http://127.0.0.1:8000 --rates 50,100``:
ramps the offered load on a running server and records what it does.

For each mode and each rate (requests per second, in the given order) it sends
``min(rate x --duration-s, --max-requests)`` requests of ``--images-per-request``
random images each (``.npy``, the server's input shape; default 1, at most the
server's ``max_batch``) at Poisson arrival times (an open loop: a request does not wait
for the one before), then waits for every answer (at most ``--timeout-s`` each). More
images per request put more of the server's time into the network and less into
per-request HTTP work. Modes: ``adaptive`` (the server's controller chooses) and an
instance name such as ``full`` (every request pins it, as a server started with
``--instance full`` would serve). Only loopback addresses are accepted.

Per (mode, rate) it records: the images per request; requests sent, answered (HTTP
200) and failed (any other status or a timeout); p50 and p95 latency in ms over every
request (a failed one counts as infinitely slow); the p95 of the latency the server
itself reports for the answered ones (from receiving a request to answering it, so the
rest of the p95 is HTTP and the client); throughput (answered requests per
second, first send to last answer); the mix of instances served (share of answers);
and the expected top-1 error of what was served (the mean over answers of the served
instance's error from the export's manifest, null where unknown). It writes
``loadtest.csv`` and ``loadtest.png`` (p95 latency with the server's latency target,
and expected error, against the offered rate) into ``--out``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow loads
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=False)

import asyncio
import io
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from absl import flags

from sdpoint_jax import cli

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADAPTIVE = "adaptive"
MAX_DURATION_S = 120.0
MAX_REQUESTS = 20_000
IMAGE_POOL = 16

Row = dict[str, Any]


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("url", "http://127.0.0.1:8000", "the server (loopback only)", **define)
    flags.DEFINE_list("rates", None, "offered loads, requests per second, e.g. 50,100", **define)
    flags.DEFINE_list(
        "modes", [ADAPTIVE, "full"], "'adaptive' and/or instances every request pins", **define
    )
    flags.DEFINE_float(
        "duration-s", 10.0, "seconds of arrivals per rate", lower_bound=0.1, **define
    )
    flags.DEFINE_integer(
        "max-requests",
        2000,
        "most requests per rate",
        lower_bound=1,
        upper_bound=MAX_REQUESTS,
        **define,
    )
    flags.DEFINE_float("timeout-s", 10.0, "longest wait for one answer", lower_bound=0.1, **define)
    flags.DEFINE_integer(
        "images-per-request",
        1,
        "images in every request (at most the server's max_batch)",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_string("out", ".", "directory for loadtest.csv and loadtest.png", **define)
    flags.DEFINE_integer("seed", 0, "random images and arrival times", **define)


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash; ``ValueError`` unless its host is loopback."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"--url must be http:// on a loopback address {LOOPBACK}, got {url!r}")
    return url.rstrip("/")


def parse_rates(texts: Sequence[str]) -> list[float]:
    """``["50", "100"]`` -> ``[50.0, 100.0]``; ``ValueError`` naming a rate that is not
    a positive number."""
    rates = []
    for text in texts:
        try:
            rate = float(text)
        except ValueError:
            rate = float("nan")
        if not rate > 0 or rate == float("inf"):
            raise ValueError(f"every rate must be a positive number of requests/s, got {text!r}")
        rates.append(rate)
    return rates


def summarise(
    mode: str,
    rate: float,
    results: Sequence[tuple[float, dict | None]],
    elapsed_s: float,
    errors: dict[str, float | None],
    images_per_request: int,
) -> Row:
    """One CSV row (module docstring) from ``(latency_ms, answer or None)`` per request
    of ``images_per_request`` images; ``errors``: the manifest's top-1 error per
    instance."""
    latencies = np.array([ms if answer is not None else np.inf for ms, answer in results])
    answers = [answer for _, answer in results if answer is not None]
    mix = Counter(answer["instance"] for answer in answers)
    known = [errors[name] for name in mix.elements()]
    expected = None if not known or None in known else float(np.mean(known))
    return {
        "mode": mode,
        "rate": rate,
        "images_per_request": images_per_request,
        "sent": len(results),
        "answered": len(answers),
        "failed": len(results) - len(answers),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "server_p95_ms": (
            float(np.percentile([answer["latency_ms"] for answer in answers], 95))
            if answers
            else None
        ),
        "throughput": len(answers) / elapsed_s,
        "mix": ";".join(
            f"{name}={count / len(answers):.3f}" for name, count in sorted(mix.items())
        ),
        "expected_top1_error": expected,
    }


async def _ramp(
    url: str,
    mode: str,
    rate: float,
    *,
    bodies: Sequence[bytes],
    count: int,
    timeout_s: float,
    rng: np.random.Generator,
) -> tuple[list[tuple[float, dict | None]], float]:
    import aiohttp

    query = "" if mode == ADAPTIVE else f"?instance={mode}"
    arrivals = np.cumsum(rng.exponential(1.0 / rate, count))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(index: int, at: float, start: float) -> tuple[float, dict | None]:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            try:
                async with session.post(
                    f"{url}/v1/classify{query}",
                    data=bodies[index % len(bodies)],
                    headers={"Content-Type": "application/x-npy"},
                ) as response:
                    answer = await response.json() if response.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                answer = None
            return 1e3 * (time.perf_counter() - sent), answer

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i, at, start) for i, at in enumerate(arrivals)))
        return list(results), time.perf_counter() - start


async def _health(url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as response:
        return await response.json()


def plot(rows: Sequence[Row], slo_ms: float, path: Path) -> None:
    """p95 latency (log scale, the target dashed) and expected top-1 error against the
    offered rate, one line per mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    latency, error = figure.subplots(1, 2)
    for mode in dict.fromkeys(row["mode"] for row in rows):
        mine = [row for row in rows if row["mode"] == mode]
        rates = [row["rate"] for row in mine]
        p95 = [min(row["p95_ms"], 1e6) for row in mine]
        latency.plot(rates, p95, marker="o", label=mode)
        error.plot(
            rates,
            [
                np.nan if row["expected_top1_error"] is None else row["expected_top1_error"]
                for row in mine
            ],
            marker="o",
            label=mode,
        )
    latency.axhline(slo_ms, color="grey", linestyle="--", label=f"target {slo_ms:g} ms")
    latency.set(xlabel="offered load (requests/s)", ylabel="p95 latency (ms)", yscale="log")
    error.set(xlabel="offered load (requests/s)", ylabel="expected top-1 error of served (%)")
    for axes in (latency, error):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def loadtest(flag_values: flags.FlagValues) -> list[Row]:
    """Runs every (mode, rate) in turn; writes and returns the rows."""
    from sdpoint_jax.evaluation.evaluate import write_csv

    if not flag_values.rates:
        raise cli.UsageError("--rates is required, e.g. --rates 50,100,200")
    url = check_loopback(flag_values.url)
    rates = parse_rates(flag_values.rates)
    duration = flag_values["duration-s"].value
    if duration > MAX_DURATION_S:
        raise ValueError(f"--duration-s must be at most {MAX_DURATION_S:g}, got {duration:g}")
    health = asyncio.run(_health(url))
    errors = {level["name"]: level["top1_error"] for level in health["instances"]}
    modes = list(dict.fromkeys(flag_values.modes))
    for mode in modes:
        if mode != ADAPTIVE and mode not in errors:
            raise ValueError(f"mode {mode!r} is neither 'adaptive' nor one of {list(errors)}")
    images = flag_values["images-per-request"].value
    if images > health["max_batch"]:
        raise ValueError(
            f"--images-per-request must be at most the server's max_batch "
            f"({health['max_batch']}), got {images}"
        )
    rng = np.random.default_rng(flag_values.seed)
    shape = (images, *health["input_shape"])
    bodies = []
    for _ in range(IMAGE_POOL):
        buffer = io.BytesIO()
        np.save(buffer, rng.integers(0, 256, shape, dtype=np.uint8))
        bodies.append(buffer.getvalue())
    rows = []
    for mode in modes:
        for rate in rates:
            count = min(max(1, int(rate * duration)), flag_values["max-requests"].value)
            results, elapsed = asyncio.run(
                _ramp(
                    url,
                    mode,
                    rate,
                    bodies=bodies,
                    count=count,
                    timeout_s=flag_values["timeout-s"].value,
                    rng=rng,
                )
            )
            row = summarise(mode, rate, results, elapsed, errors, images)
            rows.append(row)
            print(
                f"{mode:>9} {rate:>7g}/s: p50 {row['p50_ms']:8.1f} ms, p95 {row['p95_ms']:8.1f} "
                f"ms (in the server {row['server_p95_ms'] or float('nan'):.1f}), "
                f"{row['throughput']:7.1f}/s answered, {row['failed']} failed, "
                f"served {row['mix']}",
                flush=True,
            )
    out = Path(flag_values.out)
    write_csv(rows, out / "loadtest.csv")
    plot(rows, float(health["slo_ms"]), out / "loadtest.png")
    print(f"wrote {out / 'loadtest.csv'} and {out / 'loadtest.png'}")
    return rows


PROGRAM = cli.Program(
    module="sdpoint_jax.serve.loadtest",
    description=__doc__,
    define_flags=define_flags,
    commands=cli.Command(loadtest),
)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Runs the command line ``argv`` (default: this process's, without the program name)."""
    return cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
