"""The launch contract of a multi-process job and the local launcher's pieces (no process
is started here: tests/training/test_multiprocess.py runs real jobs)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from sdpoint_jax.training import local_processes, parallel
from sdpoint_jax.training.parallel import Launch, LaunchError, launch_from_environment

GOOD = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:12355",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
}


def test_the_three_variables_describe_the_launch():
    assert launch_from_environment(GOOD) == Launch("10.0.0.1:12355", 4, 3)
    assert launch_from_environment({"PATH": "/bin"}) is None
    assert launch_from_environment({name: "" for name in GOOD}) is None  # set but empty


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"JAX_PROCESS_ID": None},
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES set but JAX_PROCESS_ID missing",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": None, "JAX_NUM_PROCESSES": None},
            "JAX_PROCESS_ID set but JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES missing",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "node0"},
            "JAX_COORDINATOR_ADDRESS='node0' is not HOST:PORT with a port in [1, 65535]",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "node0:70000"}, "'node0:70000' is not HOST:PORT"),
        ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer >= 1"),
        ({"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0 is not an integer >= 1"),
        ({"JAX_PROCESS_ID": "4"}, r"JAX_PROCESS_ID=4 is not an integer in [0, 4)"),
        ({"JAX_PROCESS_ID": "-1"}, r"JAX_PROCESS_ID=-1 is not an integer in [0, 4)"),
    ],
)
def test_a_missing_or_bad_variable_is_one_line_naming_it(changes, message):
    environ = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    with pytest.raises(LaunchError) as info:
        launch_from_environment(environ)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # the command lines' user errors


def test_a_single_process_joins_nothing(monkeypatch):
    for name in parallel.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallel, "detected_cluster", lambda: None)
    assert parallel.initialize_distributed() is None


def test_process_environment_sets_the_launch_and_the_simulated_devices():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/d", "A": "1"}
    env = local_processes.process_environment(
        environ, port=4242, processes=3, process_id=2, devices=2
    )
    assert launch_from_environment(env) == Launch("127.0.0.1:4242", 3, 2)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/d --xla_force_host_platform_device_count=2"
    assert env["A"] == "1" and environ["XLA_FLAGS"].endswith("/d")  # input untouched
    kept = local_processes.process_environment(
        environ, port=1, processes=1, process_id=0, devices=None
    )
    assert kept["XLA_FLAGS"] == environ["XLA_FLAGS"]


def test_failed_process_statuses_in_words():
    assert local_processes.describe_status(3) == "exited with status 3"
    assert local_processes.describe_status(-signal.SIGKILL) == "was killed by SIGKILL"


def test_a_failed_process_stops_the_others_and_is_named():
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    children = [subprocess.Popen(sleeper), subprocess.Popen(failing)]
    with pytest.raises(local_processes.ProcessFailedError) as info:
        local_processes._supervise(children, grace_seconds=5)
    assert str(info.value) == (
        f"process 1 (pid {children[1].pid}) exited with status 3; the job was stopped "
        "(1 other process(es) ended)"
    )
    assert children[0].returncode == -signal.SIGTERM


@pytest.mark.parametrize(
    ("argument", "message"),
    [(0, "--local-processes must be >= 1"), (-1, "--local-processes must be >= 1")],
)
def test_bad_launcher_arguments(argument, message):
    with pytest.raises(ValueError, match=message):
        local_processes.run_local_processes("sdpoint_jax.main", ["train"], processes=argument)
