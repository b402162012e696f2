"""A real multi-process job: ``python -m sdpoint_jax.launch`` with 2 processes of 2
simulated CPU devices each against one process of 4 devices, same global batch.

Seed 15 draws instances (3, 0.75), (2, 0.5), (3, 0.75), (3, 0.75) at steps 0-3, so the
four runs compile two programs per process layout (the session's compilation cache keeps
them across runs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import SHARED_DATA_DIR, needs_cifar10

pytestmark = pytest.mark.first

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 4
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def overrides(cache_dir: Path, max_steps: int | None) -> list[str]:
    return [
        "--config=experiments/configs/cifar10_quick.py",
        f"--config.data.data_dir={SHARED_DATA_DIR}",
        "--config.data.train_split=train[:256]",
        "--config.model.name=wrn-10-1",
        "--config.seed=15",
        "--config.optim.batch_size=16",
        "--config.optim.num_epochs=100",
        f"--config.run.max_steps={max_steps}",
        "--config.run.checkpoint_every_steps=2",
        "--config.run.keep_checkpoints=100",
        "--config.run.log_every_steps=1",
        "--config.run.eval_every_epochs=1000",
        "--config.compile.precompile=False",
        "--config.compile.conv_lowering=xla",  # compiles faster than matmul_grad
        f"--config.compile.cache_dir={cache_dir}",
    ]


def environment(devices: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    # the session's XLA flags (tests/conftest.py) and this job's device count
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    return env


def start(workdir: Path, cache_dir: Path, max_steps: int, processes: int) -> subprocess.Popen:
    """``train`` (resuming) in ``processes`` processes (through the launcher) of
    ``DEVICES`` devices in all."""
    train = ["train", f"--workdir={workdir}", "--resume", *overrides(cache_dir, max_steps)]
    if processes == 1:
        command = ["-m", "sdpoint_jax.main", *train]
    else:
        launcher = ["-m", "sdpoint_jax.launch", f"--local-processes={processes}"]
        command = [*launcher, f"--devices-per-process={DEVICES // processes}", "--grace-seconds=2"]
        command += ["--", *train]
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=environment(DEVICES if processes == 1 else 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train(workdir: Path, cache_dir: Path, max_steps: int, processes: int) -> str:
    process = start(workdir, cache_dir, max_steps, processes)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def saved_state(workdir: Path, step: int) -> dict:
    """Checkpoint ``step`` of ``workdir``'s training state, every leaf a numpy array."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=restore)["state"]


def assert_states_close(a: dict, b: dict) -> float:
    """Every parameter, BN statistic and optimizer moment of ``a`` equals ``b``'s
    within :data:`TOLERANCE`; returns the largest difference relative to the leaf's
    largest magnitude."""
    flat_a, flat_b = (ocp.tree.to_flat_dict(tree) for tree in (a, b))
    assert flat_a.keys() == flat_b.keys()
    assert any(key[0] == "batch_stats" for key in flat_a)
    largest = 0.0
    for key, value in flat_a.items():
        np.testing.assert_allclose(value, flat_b[key], **TOLERANCE, err_msg="/".join(key))
        scale = float(np.max(np.abs(flat_b[key]))) or 1.0
        largest = max(largest, float(np.max(np.abs(value - flat_b[key]))) / scale)
    return largest


def written_files(workdir: Path) -> list[str]:
    """The files of ``workdir`` outside the checkpoints (process 0's only)."""
    return sorted(
        str(path.relative_to(workdir).parent)
        if path.parent.name == "tensorboard"
        else str(path.relative_to(workdir))
        for path in workdir.rglob("*")
        if path.is_file() and "checkpoints" not in path.parts
    )


def logged_steps(workdir: Path) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    return [(row["step"], row["instance"]) for row in rows if "loss" in row]


def process_one(launcher: subprocess.Popen) -> int:
    """The pid of process 1 among the launcher's children."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"JAX_PROCESS_ID=1" in environ:
            return int(pid)
    raise AssertionError(f"no process 1 among {children}")


@needs_cifar10
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_two_processes_train_as_one_and_resume_across_layouts(tmp_path, compilation_cache_dir):
    two, one = tmp_path / "two", tmp_path / "one"
    train(two, compilation_cache_dir, 2, processes=2)
    train(one, compilation_cache_dir, 2, processes=1)
    # the same steps and instances, logged once, and the same files: process 0's only
    assert logged_steps(two) == logged_steps(one) == [(1, "3:0.75"), (2, "2:0.5")]
    assert written_files(two) == written_files(one) == ["tensorboard", "train_log.jsonl"]
    largest = assert_states_close(saved_state(two, 2), saved_state(one, 2))
    print(f"2 processes vs 1 at step 2: largest relative difference {largest:.2e}")

    # resume 2 -> 1 process, and 1 -> 2, where process 1 is then killed after step 4
    two_to_one, one_to_two = tmp_path / "two_to_one", tmp_path / "one_to_two"
    shutil.copytree(two, two_to_one)
    shutil.copytree(one, one_to_two)
    train(two_to_one, compilation_cache_dir, 4, processes=1)
    launcher = start(one_to_two, compilation_cache_dir, 1000, processes=2)
    step_four = one_to_two / "checkpoints" / "4"
    deadline = time.monotonic() + 240
    while not step_four.is_dir():
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "step 4 was not saved"
        time.sleep(0.05)
    os.kill(process_one(launcher), signal.SIGKILL)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, output[-3000:]
    assert "error: process 1 (pid " in output and "was killed by SIGKILL" in output
    assert logged_steps(two_to_one) == [*logged_steps(two), (3, "3:0.75"), (4, "3:0.75")]
    largest = assert_states_close(saved_state(one_to_two, 4), saved_state(two_to_one, 4))
    print(
        f"resumed 1 -> 2 vs 2 -> 1 processes at step 4: largest relative difference {largest:.2e}"
    )
