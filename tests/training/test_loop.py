"""Training workflow on real CIFAR-10 (tiny model, a few steps): exact resume, errors,
calibrate -> evaluate -> select, and data-parallel equivalence on 8 CPU devices."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sdpoint_jax.evaluation.selection import select_run
from sdpoint_jax.evaluation.workflow import calibrate_run, evaluate_run
from sdpoint_jax.training.checkpoint import CheckpointError
from sdpoint_jax.training.loop import train
from sdpoint_jax.training.run_dir import RunDir, Source
from tests.conftest import (
    SHARED_DATA_DIR,
    TRAIN_SPLIT,
    TRAINED_STEPS,
    losses,
    needs_cifar10,
    tiny_config,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [needs_cifar10, pytest.mark.first]


def test_log_counts_training_seconds_of_the_steps(trained_run):
    rows = [
        json.loads(line)
        for line in (trained_run.workdir / "train_log.jsonl").read_text().splitlines()
    ]
    seconds = [r["train_seconds"] for r in rows if "loss" in r]
    assert len(seconds) == TRAINED_STEPS == 6 and seconds[0] > 0
    assert all(a < b for a, b in itertools.pairwise(seconds))


def assert_same_state(state, expected) -> None:
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resumed_run_repeats_the_uninterrupted_run_exactly(trained_run, tmp_path, capsys):
    train(tiny_config(3), tmp_path, resume=False)
    state = train(tiny_config(TRAINED_STEPS), tmp_path, resume=True)
    assert losses(tmp_path) == losses(trained_run.workdir)
    assert len(losses(tmp_path)) == 6
    assert len({instance for _, _, instance in losses(tmp_path)}) > 1  # instances drawn
    assert_same_state(state, trained_run.state)

    # the newest step damaged: resume reads step 3, moves step 6 aside, trains it again
    checkpoints = tmp_path / "checkpoints"
    for path in (checkpoints / "6" / "state").glob("**/d/*"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert_same_state(train(tiny_config(TRAINED_STEPS), tmp_path, resume=True), trained_run.state)
    output = capsys.readouterr()
    assert f"warning: checkpoint step 6 in {checkpoints} is corrupted" in output.err
    assert f"moved it to {checkpoints / '6.corrupted'} and read step 3 instead" in output.err
    assert f"resuming from checkpoint step 3 in {checkpoints}" in output.out
    # an explicit step: the newer one is moved aside too
    state = train(tiny_config(TRAINED_STEPS), tmp_path, resume=False, resume_step=3)
    assert_same_state(state, trained_run.state)
    assert f"moved step 6 aside to {checkpoints / '6.superseded'}" in capsys.readouterr().out
    names = sorted(path.name for path in checkpoints.iterdir())
    assert [name for name in names if name[0].isdigit()] == [
        "3",
        "6",
        "6.corrupted",
        "6.superseded",
    ]
    with pytest.raises(CheckpointError, match=r"--resume-step=4 .*available steps: \[3, 6\]"):
        train(tiny_config(TRAINED_STEPS), tmp_path, resume=True, resume_step=4)


def test_existing_checkpoint_is_never_overwritten(trained_run, tmp_path):
    workdir = trained_run.copy(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint.*--resume"):
        train(tiny_config(TRAINED_STEPS), workdir, resume=False)


def test_resume_with_a_different_config_is_refused(trained_run, tmp_path):
    workdir = trained_run.copy(tmp_path / "run")
    config = tiny_config(8)
    config.optim.learning_rate = 0.05
    with pytest.raises(
        CheckpointError, match=r"different config \(optim\.learning_rate: 0\.1 -> 0\.05\)"
    ):
        train(config, workdir, resume=True)


def test_calibrate_evaluate_select(trained_run, tmp_path):
    workdir = trained_run.copy(tmp_path / "run")
    config = tiny_config(TRAINED_STEPS)
    calibrate_run(config, workdir)
    assert (workdir / "calibrated").is_dir()
    rows = evaluate_run(config, workdir)
    assert len(rows) == 2 * 7  # 7 instances of wrn-10-1, instance BN and UBN
    assert {r["bn_mode"] for r in rows} == {"instance", "uniform"}
    assert all(r["examples"] == 48 for r in rows)
    for name in ("results.csv", "results.json", "cost_error.png"):
        assert (workdir / name).stat().st_size > 0
    run_dir = RunDir(workdir)
    assert run_dir.recorded_source(run_dir.results_json) == Source(6, "calibrated")
    assert run_dir.is_current(run_dir.calibrated) and run_dir.is_current(run_dir.results_json)
    budget = sorted(r["gflops"] for r in rows)[3]
    chosen = select_run(
        workdir, budget_gflops=budget, budget_ms=None, latency_file=None, batch=None
    )
    assert chosen["gflops"] <= budget and chosen["bn_mode"] == "instance"
    fitting = [r for r in rows if r["bn_mode"] == "instance" and r["gflops"] <= budget]
    assert chosen["top1_error"] == min(r["top1_error"] for r in fitting)
    with pytest.raises(ValueError, match="budget"):
        select_run(workdir, budget_gflops=1e-6, budget_ms=None, latency_file=None, batch=None)


EQUIVALENCE_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from sdpoint_jax.training import parallel
    from sdpoint_jax.core.instance import Instance
    from sdpoint_jax.models import create
    from sdpoint_jax.training.run import create_optimizer, initial_state
    from sdpoint_jax.training.steps import train_programs
    from sdpoint_jax.training.trainee import SDPointTrainee
    from sdpoint_jax.config import cifar_config

    assert len(jax.devices()) == 8, jax.devices()
    model = SDPointTrainee(create("wrn-10-1"))
    config = cifar_config("wrn-10-1", "cifar10")
    config.optim.learning_rate = 0.01  # at 0.1, random labels make 3 steps chaotic
    tx = create_optimizer(config, steps_per_epoch=100)
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
         "label": rng.integers(0, 10, 16).astype(np.int32)}
        for _ in range(3)
    ]
    instances = [Instance.full(), Instance(2, 0.5), Instance(3, 0.75)]
    start = jax.device_get(initial_state(model, tx, 32, seed=0))  # the steps donate
    states = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.create_mesh(devices)
        state = parallel.replicate(start, mesh)
        programs = train_programs(model, tx, state, mesh, 16, 32, conv_lowering="xla")
        states.append([])
        for batch, instance in zip(batches, instances):
            state, _ = programs[instance](state, parallel.shard_batch(batch, mesh))
            states[-1].append(jax.device_get(state))
    # Every leaf after every step agrees in relative norm (float summation order only).
    for one, eight in zip(*states):
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
            a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
            assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1e-3)
    print("EQUIVALENT", len(jax.tree.leaves(states[0][-1])))
    """
)


def test_eight_devices_match_one_device():
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", EQUIVALENCE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EQUIVALENT" in result.stdout


def run_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sdpoint_jax.main", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, compilation_cache_dir):
    overrides = [
        f"--config.data.data_dir={SHARED_DATA_DIR}",
        "--config.model.name=wrn-10-1",
        "--config.optim.batch_size=16",
        "--config.run.log_every_steps=1",
        "--config.run.checkpoint_every_steps=100000",
        f"--config.data.train_split={TRAIN_SPLIT}",
        "--config.compile.precompile=False",
        f"--config.compile.cache_dir={compilation_cache_dir}",
    ]
    process = run_cli(
        "train",
        "--config=experiments/configs/cifar10_quick.py",
        f"--workdir={tmp_path}",
        *overrides,
    )
    log = tmp_path / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_text().count('"loss"') >= 2):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: saved step" in output
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 2
    assert f"saved step {saved[0]} and stopped" in output


def test_cli_reports_usage_and_missing_results(tmp_path):
    process = run_cli("evaluate", f"--workdir={tmp_path}")
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "needs --config" in output
    process = run_cli("fly", f"--workdir={tmp_path}")
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "give one command out of train" in output
    process = run_cli("select", f"--workdir={tmp_path}", "--budget-gflops=1")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert f"error: no evaluation results at {tmp_path}/results.json" in output


def test_bfloat16_compute_trains_with_float32_state():
    import functools

    import jax.numpy as jnp

    from sdpoint_jax.core.instance import Instance
    from sdpoint_jax.models import create
    from sdpoint_jax.training.run import create_optimizer, initial_state
    from sdpoint_jax.training.steps import train_step
    from sdpoint_jax.training.trainee import SDPointTrainee

    model = SDPointTrainee(create("wrn-10-1", dtype=jnp.bfloat16))
    tx = create_optimizer(tiny_config(1), steps_per_epoch=1000)
    state = initial_state(model, tx, image_size=16, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    step = jax.jit(functools.partial(train_step, trainee=model, tx=tx), static_argnames="setting")
    losses = []
    for instance in [Instance.full(), Instance(2, 0.5)] * 6:
        state, metrics = step(state, batch, setting=instance)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:2])  # fits the fixed batch
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


def test_train_programs_compute_the_train_step_with_one_shared_update_program():
    import functools

    from sdpoint_jax.core.instance import Instance
    from sdpoint_jax.models import create
    from sdpoint_jax.training import parallel
    from sdpoint_jax.training.run import create_optimizer, initial_state
    from sdpoint_jax.training.steps import train_programs, train_step
    from sdpoint_jax.training.trainee import SDPointTrainee

    model = SDPointTrainee(create("wrn-10-1"))
    tx = create_optimizer(tiny_config(1), steps_per_epoch=1000)
    mesh = parallel.create_mesh()
    initial = initial_state(model, tx, image_size=16, seed=0)
    programs = train_programs(
        model, tx, parallel.replicate(initial, mesh), mesh, 8, 16, conv_lowering="xla"
    )
    fused = jax.jit(functools.partial(train_step, trainee=model, tx=tx), static_argnames="setting")
    rng = np.random.default_rng(0)
    expected = jax.tree.map(np.array, initial)  # a copy: the programs consume their state
    state = parallel.replicate(initial, mesh)
    for instance in [Instance.full(), Instance(2, 0.5)]:
        batch = {
            "image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        consumed = state
        state, metrics = programs[instance](state, parallel.shard_batch(batch, mesh))
        expected, expected_metrics = fused(expected, batch, setting=instance)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(consumed))  # donated
        np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert int(state.step) == 2
    assert len(programs) == 2 and len(programs.update) == 1
