"""A real multi-process job: ``python -m sdpoint_jax.launch`` with 2 processes of 2
simulated CPU devices each, resumed from and into a run of one device (this test's
process), with the same global batch.

Seed 15 draws instances (3, 0.75), (2, 0.5), (3, 0.75), (3, 0.75) at steps 1-4, so the
runs compile few programs per process layout (the session's compilation cache keeps
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

from sdpoint_jax.config import load_config, set_field
from tests.conftest import SHARED_DATA_DIR, needs_cifar10

pytestmark = pytest.mark.first

ROOT = Path(__file__).resolve().parents[2]
PROCESSES, DEVICES_PER_PROCESS = 2, 2
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


# The run's configuration: experiments/configs/cifar10_quick.py with these fields set.
CONFIG_FILE = "experiments/configs/cifar10_quick.py"
OVERRIDES = {
    "data.data_dir": str(SHARED_DATA_DIR),
    "data.train_split": "train[:256]",
    "model.name": "wrn-10-1",
    "seed": 15,
    "optim.batch_size": 16,
    "optim.num_epochs": 100,
    "run.checkpoint_every_steps": 2,
    "run.keep_checkpoints": 100,
    "run.log_every_steps": 1,
    "run.eval_every_epochs": 1000,
    "compile.precompile": False,
    "compile.conv_lowering": "xla",  # compiles faster than matmul_grad
}


def fields(cache_dir: Path, max_steps: int) -> dict:
    return {**OVERRIDES, "run.max_steps": max_steps, "compile.cache_dir": str(cache_dir)}


def train_here(workdir: Path, cache_dir: Path, max_steps: int) -> None:
    """``train`` (resuming) in this process, on its one device."""
    from sdpoint_jax.training.loop import train  # TensorFlow: only where a run trains

    config = load_config(str(ROOT / CONFIG_FILE))
    for path, value in fields(cache_dir, max_steps).items():
        set_field(config, path, value)
    train(config, workdir, resume=True)


def launch(workdir: Path, cache_dir: Path, max_steps: int) -> subprocess.Popen:
    """``train`` (resuming) through the launcher in :data:`PROCESSES` processes of
    :data:`DEVICES_PER_PROCESS` simulated CPU devices each."""
    overrides = [f"--config.{path}={value}" for path, value in fields(cache_dir, max_steps).items()]
    train = ["train", f"--workdir={workdir}", "--resume", f"--config={CONFIG_FILE}", *overrides]
    launcher = ["-m", "sdpoint_jax.launch", f"--local-processes={PROCESSES}"]
    launcher += [f"--devices-per-process={DEVICES_PER_PROCESS}", "--grace-seconds=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, *launcher, "--", *train],
        cwd=ROOT,
        env=env,  # the session's XLA flags (tests/conftest.py); the launcher sets the devices
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


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
    # the reference: this process (one device), steps 1-8 with a resume at step 2
    reference, two = tmp_path / "reference", tmp_path / "two"
    train_here(reference, compilation_cache_dir, 2)
    shutil.copytree(reference, two)
    train_here(reference, compilation_cache_dir, 8)
    steps = logged_steps(reference)
    assert [step for step, _ in steps] == list(range(1, 9))
    assert steps[:4] == [(1, "3:0.75"), (2, "2:0.5"), (3, "3:0.75"), (4, "3:0.75")]

    # resume 1 device -> 2 processes, where process 1 is killed after step 4
    files_before = written_files(two)
    assert files_before == ["tensorboard", "train_log.jsonl"]
    launcher = launch(two, compilation_cache_dir, 1000)
    step_four = two / "checkpoints" / "4"
    deadline = time.monotonic() + 240
    while not step_four.is_dir():
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "step 4 was not saved"
        time.sleep(0.05)
    os.kill(process_one(launcher), signal.SIGKILL)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, output[-3000:]
    assert "error: process 1 (pid " in output and "was killed by SIGKILL" in output
    # steps 3 and 4 logged once, and one new file (TensorBoard's): process 0's only
    assert logged_steps(two)[:4] == steps[:4]
    assert written_files(two) == sorted([*files_before, "tensorboard"])
    largest = assert_states_close(saved_state(two, 4), saved_state(reference, 4))
    print(f"2 processes vs 1 device at step 4: largest relative difference {largest:.2e}")

    # resume 2 processes -> this process, from the newest checkpoint (4, or 6 if process
    # 0 got there before the kill)
    one = tmp_path / "one"
    shutil.copytree(two, one)
    train_here(one, compilation_cache_dir, 8)
    assert dict(logged_steps(one)) == dict(steps)
    largest = assert_states_close(saved_state(one, 8), saved_state(reference, 8))
    print(f"resumed 2 processes -> 1 device at step 8: largest difference {largest:.2e}")
