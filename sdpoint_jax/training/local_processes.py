"""Several processes of one JAX job on this machine, supervised as one
(``python -m sdpoint_jax.launch``).

Process ``i`` of ``N`` runs ``python -m MODULE ARGS...`` with the launch variables of
:mod:`sdpoint_jax.training.parallel` set (coordinator ``127.0.0.1:PORT``, ``N``, ``i``)
and, where asked, ``devices`` simulated CPU devices (XLA's
``--xla_force_host_platform_device_count``). Each process is the leader of its own
process group, so a terminal's Ctrl-C reaches the launcher only, which forwards it:

* SIGINT, SIGTERM and SIGHUP received by the launcher are sent to every process still
  running (a training run saves a checkpoint on SIGTERM and stops);
* when a process fails (a non-zero exit status, or killed by a signal) while others
  run, the others cannot go on (every step and every save needs all processes): they get
  SIGTERM, then SIGKILL after ``grace_seconds``, and :class:`ProcessFailedError` names
  the process that failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from sdpoint_jax.errors import ProcessFailedError
from sdpoint_jax.training.parallel import ADDRESS_VARIABLE, COUNT_VARIABLE, ID_VARIABLE

HOST = "127.0.0.1"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL_SECONDS = 0.1


def free_port() -> int:
    """A TCP port on :data:`HOST` that is free now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def process_environment(
    environ: dict[str, str], *, port: int, processes: int, process_id: int, devices: int | None
) -> dict[str, str]:
    """``environ`` with the launch variables of process ``process_id`` of ``processes``
    and, unless ``devices`` is ``None``, that many simulated CPU devices (replacing any
    device count already in ``XLA_FLAGS``)."""
    env = dict(environ)
    env[ADDRESS_VARIABLE] = f"{HOST}:{port}"
    env[COUNT_VARIABLE] = str(processes)
    env[ID_VARIABLE] = str(process_id)
    if devices is not None:
        kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])
    return env


def describe_status(status: int) -> str:
    """``Popen.returncode`` in words (a negative code is the signal that killed it)."""
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def run_local_processes(
    module: str,
    args: Sequence[str],
    *,
    processes: int,
    devices: int | None = None,
    port: int | None = None,
    grace_seconds: float = 10.0,
) -> None:
    """Runs ``python -m module *args`` as ``processes`` processes of one job and
    returns once all have exited with status 0 (see the module docstring).

    Raises:
      ValueError: ``processes`` < 1, ``devices`` < 1 or ``grace_seconds`` < 0.
      ProcessFailedError: a process failed; the others were stopped.
    """
    if processes < 1:
        raise ValueError(f"--local-processes must be >= 1, got {processes}")
    if devices is not None and devices < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices}")
    if grace_seconds < 0:
        raise ValueError(f"--grace-seconds must be >= 0, got {grace_seconds}")
    port = free_port() if port is None else port
    children: list[subprocess.Popen] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        for process_id in range(processes):
            env = process_environment(
                dict(os.environ),
                port=port,
                processes=processes,
                process_id=process_id,
                devices=devices,
            )
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *args], env=env, start_new_session=True
                )
            )
        _supervise(children, grace_seconds)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _supervise(children: list[subprocess.Popen], grace_seconds: float) -> None:
    """Waits for every child; on the first failure, stops the others and raises."""
    while True:
        statuses = [child.poll() for child in children]
        failed = next((i for i, s in enumerate(statuses) if s not in (None, 0)), None)
        if failed is not None:
            break
        if all(s == 0 for s in statuses):
            return
        time.sleep(POLL_SECONDS)
    running = [child for child in children if child.poll() is None]
    message = f"process {failed} (pid {children[failed].pid}) " + describe_status(
        children[failed].returncode
    )
    if running:
        print(
            f"{message}: stopping the other {len(running)} process(es)",
            file=sys.stderr,
            flush=True,
        )
    _stop(running, grace_seconds)
    raise ProcessFailedError(
        f"{message}; the job was stopped ({len(running)} other process(es) ended)"
        if running
        else message
    )


def _stop(children: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM to each of ``children``, SIGKILL to those still running after
    ``grace_seconds``; returns once all have exited."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_seconds
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
