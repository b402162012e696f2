"""The server of an export: the controller's choice for a latency table and a queue,
and one server process end to end (classify, every kind of refused input, metrics, a
load test, SIGTERM draining)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data.specs import SPECS
from sdpoint_jax.deploy.artifacts import write_export
from sdpoint_jax.deploy.loader import load_exported
from sdpoint_jax.errors import MemoryMapLimitError
from sdpoint_jax.models import create
from sdpoint_jax.serve import loadtest
from sdpoint_jax.serve.controller import (
    RECENT_BATCHES,
    RECENT_S,
    Level,
    Slowdown,
    bucket_size,
    buckets,
    choose,
    predicted_ms,
)
from sdpoint_jax.serve.engine import Engine
from sdpoint_jax.xla_cpu.compiler_options import INFERENCE_OPTION_SETS
from sdpoint_jax.xla_cpu.memory_maps import FIRST_PROGRAM_MAPS, RESERVE, MapBudget
from tests.conftest import random_variables

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------- controller

LEVELS = [Level("1:0.5", 0.1, 40.0), Level("2:0.5", 0.2, 30.0), Level("full", 0.4, 20.0)]
LATENCY = {  # ms per batch of 1, 2, 4
    **{("1:0.5", b): ms for b, ms in ((1, 1.0), (2, 1.5), (4, 2.0))},
    **{("2:0.5", b): ms for b, ms in ((1, 2.0), (2, 3.0), (4, 4.0))},
    **{("full", b): ms for b, ms in ((1, 4.0), (2, 6.0), (4, 8.0))},
}


def pick(**kwargs) -> str:
    settings = {"bucket": 4, "queued": 0, "waited_ms": 0.0, "slo_ms": 10.0, "max_batch": 4}
    return choose(LEVELS, LATENCY, **{**settings, **kwargs}).name


def test_controller_chooses_the_most_accurate_instance_within_the_target():
    assert pick() == "full"  # 8 ms <= 10
    assert pick(waited_ms=3.0) == "2:0.5"  # full: 3 + 8 > 10; 2:0.5: 3 + 4
    # 5 images queued behind: one batch of 4 and one of 1 follow
    assert predicted_ms(LATENCY, "full", 4, 5, 4) == 8.0 + 8.0 + 4.0
    assert pick(queued=5, slo_ms=20.0) == "full"
    assert pick(queued=5, slo_ms=19.0) == "2:0.5"  # 4 + 4 + 2 = 10
    assert pick(queued=5, slo_ms=9.0) == "1:0.5"  # 2 + 2 + 1 = 5
    # none fits: the one that empties the queue soonest
    assert pick(queued=5, waited_ms=50.0) == "1:0.5"
    assert pick(bucket=1, waited_ms=5.0) == "full"  # light load: 5 + 4 <= 10
    # without errors in the manifest, the costlier instance counts as more accurate
    unknown = [dataclasses.replace(level, top1_error=None) for level in LEVELS]
    assert choose(
        unknown, LATENCY, bucket=2, queued=0, waited_ms=0, slo_ms=4, max_batch=4
    ).name == ("2:0.5")
    with pytest.raises(ValueError, match="at least one instance"):
        choose([], LATENCY, bucket=1, queued=0, waited_ms=0, slo_ms=1, max_batch=4)


def test_controller_looks_ahead_at_the_requests_arriving_meanwhile():
    # 1 image/ms: full serves this batch in 8 ms, the 8 arriving meanwhile in 8 + 8 more
    # (8 + 16 > 20); (2, 0.5) serves each round of 4 in 4 ms
    assert pick(slo_ms=20.0) == "full"
    assert pick(slo_ms=20.0, arriving_per_ms=1.0) == "2:0.5"
    # 1.25 images/ms: full passes the first round (8 ms, then 10 images in 8 + 8 + 6:
    # 8 + 22 <= 30) but not the second (28 images in 56 ms); (2, 0.5) serves 4 images
    # per 4 ms, 1 per ms, so its rounds grow too; (1, 0.5) keeps up
    assert pick(slo_ms=30.0, arriving_per_ms=1.25) == "1:0.5"
    assert pick(slo_ms=30.0, arriving_per_ms=0.25) == "full"  # 2 per round: 8 + 6
    with pytest.raises(ValueError, match="arriving_per_ms must be >= 0, got -1"):
        pick(arriving_per_ms=-1.0)


def test_slowdown_scales_the_table_by_recent_batches_per_instance():
    slowdown = Slowdown()
    assert slowdown.factor() == 1.0 and slowdown.scale(LATENCY, now=0.0) == LATENCY
    for tabled, measured in ((10.0, 30.0), (4.0, 4.8), (2.0, 1.0)):  # ratios 3, 1.2, 0.5
        slowdown.observe("full", tabled, measured, at=0.0)
    slowdown.observe("1:0.5", 2.0, 2.0, at=0.5)  # ratio 1
    # fewer than OWN_BATCHES of its own: the median over all (3, 1.2, 0.5, 1)
    assert slowdown.factor("full", 0.5) == slowdown.factor() == pytest.approx(1.1)
    slowdown.observe("full", 8.0, 24.0, at=1.0)  # ratio 3; its own 4: 3, 1.2, 0.5, 3
    assert slowdown.factor("full", now=1.0) == pytest.approx(2.1)
    assert slowdown.factor("1:0.5", now=1.0) == slowdown.factor() == pytest.approx(1.2)
    scaled = slowdown.scale(LATENCY, now=1.0)
    assert scaled["full", 4] == pytest.approx(8.0 * 2.1)
    assert scaled["1:0.5", 4] == pytest.approx(2.0 * 1.2)
    # its own batches count for RECENT_S seconds, then the median over all again
    assert slowdown.factor("full", now=RECENT_S) == pytest.approx(2.1)
    assert slowdown.factor("full", now=0.5 + RECENT_S) == pytest.approx(1.2)
    for _ in range(RECENT_BATCHES):  # only the latest batches of any instance count
        slowdown.observe("2:0.5", 5.0, 5.0, at=2.0)
    assert slowdown.factor() == slowdown.factor("1:0.5", 2.0) == 1.0
    assert slowdown.factor("full", 2.0) == pytest.approx(2.1)
    with pytest.raises(ValueError, match=r"tabled latency must be > 0 ms, got 0\.0"):
        slowdown.observe("full", 0.0, 1.0, at=3.0)


def test_buckets_are_powers_of_two():
    assert buckets(8) == (1, 2, 4, 8)
    assert [bucket_size(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="power of two >= 1, got 6"):
        buckets(6)
    with pytest.raises(ValueError, match=r"images must lie in \[1, 8\], got 9"):
        bucket_size(9, 8)


# ------------------------------------------------------------------ server end to end

HW = 16
MAX_BATCH = 4
ERRORS = {"full": 10.0, "1:0.5": 30.0}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """WRN-10-1 (random weights, 16x16 inputs) exported as full and 1:0.5."""
    model = create("wrn-10-1", num_classes=10, ratios=(0.5,))
    spec = dataclasses.replace(SPECS["cifar10"], image_size=HW)
    out = tmp_path_factory.mktemp("serve") / "export"
    errors = {
        Instance.parse(name): {"top1_error": e, "top5_error": 1.0, "evaluated_examples": 10}
        for name, e in ERRORS.items()
    }
    info = {"model": "wrn-10-1", "dataset": "cifar10", "num_classes": 10, "step": 0}
    write_export(
        out,
        model,
        random_variables(model, seed=3),
        [Instance.full(), Instance(1, 0.5)],
        spec,
        platforms=("cpu",),
        info={**info, "statistics": "running-average", "bn_mode": "instance"},
        errors=errors,
    )
    return out


def test_engine_compiles_each_program_with_the_options_its_table_row_timed(export_dir, tmp_path):
    exported = load_exported(export_dir)
    device_kind = jax.devices()[0].device_kind

    def row(instance, batch, p90_ms, options=None, model="wrn-10-1"):
        named = {} if options is None else {"compiler_options": options}
        return {"model": model, "device_kind": device_kind, "instance": instance}, {
            "batch": batch,
            "p90_ms": p90_ms,
            **named,
        }

    table = [
        {**a, **b}
        for a, b in (
            row("full", 1, 1.0, "single-convolution"),
            row("full", 1, 2.0, "xla-default"),
            row("full", 2, 3.0, "single-convolution"),
            row("full", 2, 2.5, "xla-default"),
            row("full", 4, 5.0, "xla-default"),
            row("1:0.5", 1, 0.5),  # written before rows named their options
            row("1:0.5", 2, 0.1, "xla-default", model="wrn-16-1"),  # another model's
        )
    ]
    latency_file = tmp_path / "latency.json"
    latency_file.write_text(json.dumps(table))
    engine = Engine(exported, MAX_BATCH, latency_file=latency_file, repeats=1)

    assert engine.compiler_options == {
        ("full", 1): "single-convolution",
        ("full", 2): "xla-default",
        ("full", 4): "xla-default",
        ("1:0.5", 1): "single-convolution",
        ("1:0.5", 2): "xla-default",  # the engine's own set, where the table is silent
        ("1:0.5", 4): "xla-default",
    }
    listed = {("full", 1): 1.0, ("full", 2): 2.5, ("full", 4): 5.0, ("1:0.5", 1): 0.5}
    assert {key: engine.latency_ms[key] for key in listed} == listed
    assert {key for key, source in engine.latency_source.items() if source == "table"} == set(
        listed
    )
    assert all(engine.latency_ms[key] > 0 for key in engine.latency_ms)

    # the options reach XLA: each program has the library fusions of its option set
    def library_fusions(compiled) -> int:
        return compiled.as_text().count("__ynn_fusion")

    function = exported.function("full")
    reference = {}
    for options in INFERENCE_OPTION_SETS:
        jitted = jax.jit(function.call, compiler_options=INFERENCE_OPTION_SETS[options])
        spec = jax.ShapeDtypeStruct((2, HW, HW, 3), np.float32)
        reference[options] = library_fusions(jitted.lower(spec).compile())
    assert reference["single-convolution"] != reference["xla-default"]
    assert library_fusions(engine._programs["full", 2]) == reference["xla-default"]
    images = np.random.default_rng(1).uniform(0, 255, (3, HW, HW, 3)).astype(np.float32)
    for name in ("full", "1:0.5"):
        logits = exported.logits(images, name)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for bucket in (4,) if name == "full" else (4, 1):
            served = np.concatenate(
                [engine.run(name, images[i : i + bucket], bucket) for i in range(0, 3, bucket)]
            )
            np.testing.assert_allclose(served, probs, rtol=1e-4, atol=1e-6)

    with pytest.raises(ValueError, match=r"unknown inference compiler options 'fast'; choose"):
        Engine(exported, MAX_BATCH, latency_file=latency_file, option_set="fast")
    latency_file.write_text(json.dumps([{**table[0], "compiler_options": "fast"}]))
    with pytest.raises(ValueError, match=r"latency\.json: unknown inference compiler options"):
        Engine(exported, MAX_BATCH, latency_file=latency_file)


def test_engine_stops_with_a_clear_error_where_its_programs_pass_the_map_cap(export_dir):
    # a process 1 map short of room for one more program (and the maps kept free)
    full = MapBudget(limit=100_000, count=lambda: 100_000 - RESERVE - FIRST_PROGRAM_MAPS + 1)
    with pytest.raises(
        MemoryMapLimitError,
        match=r"compiled 0 of the 6 programs this server needs \(2 instance\(s\) x 3 batch "
        r"sizes\).*vm\.max_map_count=262144.*Or serve fewer instances or a smaller --max-batch",
    ):
        Engine(load_exported(export_dir), MAX_BATCH, map_budget=full)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, body: bytes | None = None, content_type: str = "application/x-npy"):
    """``(status, body bytes)`` of a GET (``body=None``) or POST."""
    headers = {} if body is None else {"Content-Type": content_type}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in Prometheus text."""
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, (name, text)
    return float(lines[0].split()[-1])


def images_served(text: str) -> float:
    """Images classified so far, over every instance, in Prometheus text."""
    prefix = "sdpoint_images_total{"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_server_end_to_end(export_dir, compilation_cache_dir, tmp_path, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compilation_cache_dir)}
    command = [sys.executable, "-m", "sdpoint_jax.serve", "--export", str(export_dir)]
    settings = ["--port", str(port), "--max-batch", str(MAX_BATCH), "--max-wait-ms", "4000"]
    server = subprocess.Popen(
        [*command, *settings, "--max-body-mb", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in server.stdout:  # start-up compiles every program, then listens
            if "Running on" in line:
                break
        else:
            pytest.fail(f"the server exited with {server.wait()} before listening")
        status, body = request(f"{url}/healthz")
        health = json.loads(body)
        assert status == 200 and health["input_shape"] == [HW, HW, 3]
        assert [(i["name"], i["top1_error"]) for i in health["instances"]] == [
            ("1:0.5", 30.0),
            ("full", 10.0),
        ]

        # a full batch is served at once, by the full network (light load)
        images = np.random.default_rng(0).uniform(0, 255, (MAX_BATCH, HW, HW, 3))
        status, body = request(f"{url}/v1/classify?top_k=3", npy(images.astype(np.float32)))
        answer = json.loads(body)
        assert status == 200 and answer["instance"] == "full" and answer["top1_error"] == 10.0
        logits = load_exported(export_dir).logits(images, "full")
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for predicted, row in zip(answer["predictions"], probs, strict=True):
            assert [p["class"] for p in predicted] == list(np.argsort(-row, kind="stable")[:3])
            np.testing.assert_allclose(
                [p["probability"] for p in predicted], np.sort(row)[::-1][:3], rtol=1e-4
            )
        pinned = {"images": images.round().tolist(), "instance": "1:0.5", "top_k": 1}
        status, body = request(
            f"{url}/v1/classify", json.dumps(pinned).encode(), "application/json"
        )
        assert status == 200 and json.loads(body)["instance"] == "1:0.5"

        one_image = np.zeros((HW, HW, 3), int).tolist()
        unknown_instance = json.dumps({"images": one_image, "instance": "2:0.5"}).encode()
        refused = {
            "wrong shape": (npy(np.zeros((2, 8, 8, 3), np.float32)), "application/x-npy", 400),
            "wrong dtype": (npy(np.zeros((HW, HW, 3), np.complex64)), "application/x-npy", 400),
            "too many": (npy(np.zeros((5, HW, HW, 3), np.uint8)), "application/x-npy", 400),
            "out of range": (npy(np.full((HW, HW, 3), 256.0)), "application/x-npy", 400),
            "malformed JSON": (b'{"images": [1, 2', "application/json", 400),
            "ragged JSON": (b'{"images": [[1], [1, 2]]}', "application/json", 400),
            "unknown instance": (unknown_instance, "application/json", 404),
            "media type": (b"images", "text/plain", 415),
            "too large": (b"0" * (2 << 20), "application/json", 413),
        }
        messages = {
            "wrong shape": r"shape \(16, 16, 3\) or \(n, 16, 16, 3\), got \(2, 8, 8, 3\)",
            "wrong dtype": "real dtype .* got complex64",
            "too many": "1 to 4 images, got 5",
            "out of range": r"within \[0, 255\]",
            "malformed JSON": "malformed JSON",
            "ragged JSON": "rectangular nested array",
            "unknown instance": r"'2:0.5' was not exported; this export has \['1:0.5', 'full'\]",
            "media type": "'text/plain' is not accepted",
            "too large": "body size",
        }
        for kind, (body, content_type, expected) in refused.items():
            status, reply = request(f"{url}/v1/classify", body, content_type)
            assert status == expected, kind
            assert re.search(messages[kind], json.loads(reply)["error"]), kind

        status, body = request(f"{url}/metrics")
        text = body.decode()
        assert status == 200
        assert metric(text, 'sdpoint_requests_total{status="200"}') == 2
        assert metric(text, 'sdpoint_requests_total{status="400"}') == 6
        assert metric(text, 'sdpoint_errors_total{kind="unknown_instance"}') == 1
        assert metric(text, 'sdpoint_errors_total{kind="too_large"}') == 1
        assert metric(text, 'sdpoint_images_total{instance="full"}') == MAX_BATCH
        assert metric(text, "sdpoint_batch_size_count") == 2
        assert metric(text, "sdpoint_request_latency_seconds_count") == 2
        assert metric(text, 'sdpoint_instance_chosen{instance="1:0.5"}') == 1
        assert metric(text, "sdpoint_queue_depth") == 0

        # a bounded load test on the loopback address, adaptive and pinned to full, with
        # 2 images in every request
        served_before = images_served(request(f"{url}/metrics")[1].decode())
        rows = loadtest.main(
            ["--url", url, "--rates", "40", "--duration-s", "0.2", "--out", str(tmp_path)]
            + ["--images-per-request", "2"]
        )
        assert [(r["mode"], r["images_per_request"], r["sent"], r["answered"]) for r in rows] == [
            ("adaptive", 2, 8, 8),
            ("full", 2, 8, 8),
        ]
        assert rows[1]["mix"] == "full=1.000" and rows[1]["expected_top1_error"] == 10.0
        # the server's own latency is part of the one the client sees
        assert all(0 < row["server_p95_ms"] <= row["p95_ms"] for row in rows)
        text = request(f"{url}/metrics")[1].decode()
        assert images_served(text) == served_before + 2 * 16
        # what the controller planned the last batch with: images arriving, table scale
        assert metric(text, "sdpoint_arrival_images_per_second") > 0
        assert metric(text, "sdpoint_latency_slowdown") > 0
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            loadtest.main(
                ["--url", url, "--rates", "40", "--out", str(tmp_path)]
                + ["--images-per-request", str(MAX_BATCH + 1)]
            )
        assert exited.value.code == 1
        assert capsys.readouterr().err == (
            f"error: --images-per-request must be at most the server's max_batch ({MAX_BATCH}), "
            f"got {MAX_BATCH + 1}\n"
        )
        with open(tmp_path / "loadtest.csv", newline="") as file:
            assert [line["mode"] for line in csv.DictReader(file)] == ["adaptive", "full"]
        assert (tmp_path / "loadtest.png").stat().st_size > 0

        # SIGTERM while a request waits for its batch to fill: it is answered, then exit 0
        waiting = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request("
                f"'{url}/v1/classify', sys.stdin.buffer.read(), "
                "{'Content-Type': 'application/x-npy'})); print(r.status)",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=False,
        )
        waiting.stdin.write(npy(np.zeros((1, HW, HW, 3), np.uint8)))
        waiting.stdin.close()
        while metric(request(f"{url}/metrics")[1].decode(), "sdpoint_queue_depth") < 1:
            assert waiting.poll() is None
        server.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=60) == 0 and waiting.stdout.read().strip() == b"200"
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_loadtest_accepts_loopback_only():
    assert loadtest.check_loopback("http://localhost:8000/") == "http://localhost:8000"
    with pytest.raises(ValueError, match=r"loopback address .* got 'http://10\.0\.0\.1:8000'"):
        loadtest.check_loopback("http://10.0.0.1:8000")
    with pytest.raises(ValueError, match="positive number of requests/s, got '-5'"):
        loadtest.parse_rates(["10", "-5"])
