"""Tests for sdpoint_jax.training.checkpoint: round trips, retention, clear errors, SIGTERM."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdpoint_jax.training.checkpoint import CheckpointError, CheckpointManager, PreemptionFlag

CONFIG = {"model": "resnet_mini", "lr": 0.1, "ratios": [0.5, 0.75], "epochs": 3}
INSTANCE_KEYS = ("full", "p3_r0p5", "p1_r0p75")


@struct.dataclass
class TrainState:
    """A trainer-like state: device arrays plus host-side counters."""

    params: Any
    opt_state: Any
    batch_stats: Any
    step: int
    host: Any


def make_state(seed: int, *, kernel_shape: tuple[int, int] = (8, 10)) -> TrainState:
    """A state with every kind of leaf the trainer holds, its values drawn from ``seed``."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    params = {
        "conv": {"kernel": jax.random.normal(next(keys), (3, 3, 2, 4))},
        "dense": {
            "kernel": jax.random.normal(next(keys), kernel_shape),
            "bias": jax.random.normal(next(keys), kernel_shape[1:], jnp.bfloat16),
        },
    }
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    batch_stats = {
        key: {"bn1": {"mean": jax.random.normal(next(keys), (4,)), "var": jnp.full((4,), i + 1.0)}}
        for i, key in enumerate(INSTANCE_KEYS)
    }
    host = {
        "seed": 1000 + seed,
        "draws": {key: seed * 7 + i for i, key in enumerate(INSTANCE_KEYS)},
    }
    return TrainState(params, opt_state, batch_stats, step=seed, host=host)


def assert_bitwise_equal(actual: Any, expected: Any) -> None:
    """Same tree structure, leaf types, dtypes and bytes."""
    actual_leaves, actual_def = jax.tree.flatten(actual)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    assert actual_def == expected_def
    for got, want in zip(actual_leaves, expected_leaves, strict=True):
        assert type(got) is type(want)
        assert np.asarray(got).dtype == np.asarray(want).dtype
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def save_steps(manager: CheckpointManager, steps: dict[int, float | None]) -> None:
    """Saves a small state at each step, with ``{"acc": value}`` unless value is None."""
    state = {"w": jnp.ones((2,)), "step": 0}
    for step, acc in steps.items():
        metrics = None if acc is None else {"acc": acc}
        assert manager.save(step, state, config=CONFIG, metrics=metrics)
    manager.wait_until_finished()


def step_dirs(directory: Path) -> list[str]:
    """Names of the entries of ``directory`` other than Orbax's root metadata."""
    return sorted(p.name for p in directory.iterdir() if p.name != "metadata")


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    state = make_state(17)
    with CheckpointManager(tmp_path) as manager:
        assert manager.save(17, state, config=CONFIG, metrics={"acc": np.float32(0.5)})

    with CheckpointManager(tmp_path) as manager:
        restored, config, meta = manager.restore(make_state(3))

    assert_bitwise_equal(restored, state)
    assert type(restored.step) is int
    assert config == CONFIG
    assert meta == {"step": 17, "metrics": {"acc": 0.5}}


def test_restore_uses_template_shardings(tmp_path: Path) -> None:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put({"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}, replicated)
    with CheckpointManager(tmp_path) as manager:
        manager.save(0, state, config=CONFIG)
        template = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
        )
        restored, _, _ = manager.restore(template)

    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated
    assert_bitwise_equal(restored, state)


def test_keep_last_keeps_exactly_the_last_steps(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=2) as manager:
        save_steps(manager, dict.fromkeys(range(1, 6), 0.5))
        assert manager.all_steps() == [4, 5]
    assert step_dirs(tmp_path) == ["4", "5"]


@pytest.mark.parametrize(("best_mode", "best_step"), [("max", 2), ("min", 1)])
def test_keep_best_outlives_the_last_steps(tmp_path: Path, best_mode: str, best_step: int) -> None:
    options = {"keep_last": 2, "keep_best": 1, "best_metric": "acc", "best_mode": best_mode}
    with CheckpointManager(tmp_path, **options) as manager:
        save_steps(manager, {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4})
        assert manager.all_steps() == [best_step, 4, 5]

    # Reopened: the ranking comes from the metrics stored on disk; steps without
    # metrics only count as recent.
    with CheckpointManager(tmp_path, **options) as manager:
        save_steps(manager, {6: None, 7: None})
        assert manager.all_steps() == [best_step, 6, 7]
    assert step_dirs(tmp_path) == [str(best_step), "6", "7"]


def test_latest_step(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        assert manager.latest_step() is None
        save_steps(manager, {10: None, 20: None, 30: None})
        assert manager.latest_step() == 30
        assert not manager.save(25, {"w": jnp.ones(2)}, config=CONFIG)
    with CheckpointManager(tmp_path) as manager:
        assert manager.latest_step() == 30


def test_restore_from_empty_directory_names_it(tmp_path: Path) -> None:
    directory = tmp_path / "no_such_run"
    with (
        CheckpointManager(directory) as manager,
        pytest.raises(CheckpointError, match=f"no checkpoint found in {re.escape(str(directory))}"),
    ):
        manager.restore(make_state(0))


def test_restore_of_a_missing_step_lists_the_saved_ones(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, {1: None, 2: None})
        with pytest.raises(CheckpointError, match=r"step 7 .*available: \[1, 2\]"):
            manager.restore({"w": jnp.ones(2), "step": 0}, step=7)


def _other_kernel_shape() -> TrainState:
    return make_state(0, kernel_shape=(5, 10))


def _full_statistics_only() -> TrainState:
    state = make_state(0)
    return state.replace(batch_stats={"full": state.batch_stats["full"]})


# templates are built in the test, not at collection (each draws and compiles arrays)
@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            _other_kernel_shape,
            "'params/dense/kernel' has shape (8, 10) in the checkpoint but (5, 10) in the "
            "template (and 1 more",
        ),
        (
            _full_statistics_only,
            "'batch_stats/p1_r0p75/bn1/mean' is in the checkpoint but not in the template "
            "(and 3 more",
        ),
    ],
    ids=["shape", "structure"],
)
def test_restore_onto_a_different_model_names_the_key_path(
    tmp_path: Path, template: Callable[[], TrainState], message: str
) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, make_state(1), config=CONFIG)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            manager.restore(template())


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("pattern", "damage"),
    [("**/d/*", _delete), ("**/d/*", _truncate), ("_METADATA", _truncate), ("_METADATA", _delete)],
    ids=["array-files-deleted", "array-files-truncated", "metadata-truncated", "metadata-deleted"],
)
def test_corrupted_checkpoint_names_step_and_directory(
    tmp_path: Path, pattern: str, damage: Any
) -> None:
    # A single array: with several, TensorStore reads still in flight when the first
    # one fails report "Event loop is closed" on stderr after the restore has raised.
    state = {"w": jnp.arange(1000.0)}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, state, config=CONFIG)
    files = [p for p in (tmp_path / "1" / "state").glob(pattern) if p.is_file()]
    assert files
    for path in files:
        damage(path)

    expected = f"checkpoint step 1 in {tmp_path} is corrupted"
    with (
        CheckpointManager(tmp_path) as manager,
        pytest.raises(CheckpointError, match=re.escape(expected)),
    ):
        manager.restore(state)


def test_resume_falls_back_to_the_newest_intact_step_and_moves_the_damaged_one_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    states = {step: {"w": jnp.arange(1000.0) + step} for step in (1, 2, 3)}
    with CheckpointManager(tmp_path, keep_last=3) as manager:
        for step, state in states.items():
            manager.save(step, state, config=CONFIG)
    damaged = sorted(p for p in (tmp_path / "3" / "state").glob("**/d/*") if p.is_file())
    assert damaged
    for path in damaged:
        _truncate(path)
    with CheckpointManager(tmp_path, keep_last=3) as manager:
        state, _, meta = manager.restore_newest_intact(states[1])
        assert manager.all_steps() == [1, 2]
    assert_bitwise_equal(state, states[2])
    assert meta["step"] == 2
    moved = tmp_path / "3.corrupted"
    assert step_dirs(tmp_path) == ["1", "2", "3.corrupted"]
    assert sorted(p for p in (moved / "state").glob("**/d/*") if p.is_file()) == [
        moved / p.relative_to(tmp_path / "3") for p in damaged
    ]  # kept, not deleted
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"warning: checkpoint step 3 in {tmp_path} is corrupted")
    assert warning.endswith(f"moved it to {moved} and read step 2 instead")
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [1, 2]
        assert manager.move_aside(2, "corrupted") == tmp_path / "2.corrupted"
        (tmp_path / "1.corrupted").mkdir()
        assert manager.move_aside(1, "corrupted") == tmp_path / "1.corrupted-2"
        with pytest.raises(CheckpointError, match="no checkpoint found in"):
            manager.restore_newest_intact(states[1])


def test_no_intact_step_names_the_damaged_ones(tmp_path: Path) -> None:
    state = {"w": jnp.arange(1000.0)}
    with CheckpointManager(tmp_path) as manager:
        manager.save(4, state, config=CONFIG)
    for path in (tmp_path / "4" / "state").glob("**/d/*"):
        _delete(path)
    with (
        CheckpointManager(tmp_path) as manager,
        pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: steps \[4\] are all"),
    ):
        manager.restore_newest_intact(state)
    assert step_dirs(tmp_path) == ["4"]  # nothing moved when nothing could be read


def test_interrupted_write_is_never_the_latest_step(tmp_path: Path) -> None:
    state = make_state(2)
    with CheckpointManager(tmp_path) as manager:
        manager.save(2, state, config=CONFIG)
    # What a save of step 3 killed before Orbax's final rename leaves behind.
    partial = tmp_path / "3.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "2", partial)
    shutil.rmtree(partial / "config")

    with CheckpointManager(tmp_path) as manager:
        assert manager.latest_step() == 2
        restored, _, meta = manager.restore(make_state(0))
        assert meta["step"] == 2
        assert_bitwise_equal(restored, state)
        assert manager.save(3, make_state(3), config=CONFIG)
    assert step_dirs(tmp_path) == ["2", "3"]


def test_process_killed_while_saving_leaves_the_previous_step(tmp_path: Path) -> None:
    # Saves are asynchronous: save() returns while the 64 MiB array is still being
    # written. The child waits until the temporary directory of step 2 exists (orbax
    # may create it in its background thread), then os._exit() ends the process as
    # SIGKILL would, without closing.
    child = textwrap.dedent(
        f"""
        import os, pathlib, time
        import jax.numpy as jnp
        from sdpoint_jax.training.checkpoint import CheckpointManager
        directory = pathlib.Path({str(tmp_path)!r})
        manager = CheckpointManager(directory)
        manager.save(1, {{"w": jnp.zeros(4096)}}, config={{}})
        manager.wait_until_finished()
        manager.save(2, {{"w": jnp.ones((4096, 4096))}}, config={{}})
        deadline = time.monotonic() + 60
        while not list(directory.glob("2.orbax-checkpoint-tmp*")):
            if (directory / "2").exists() or time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.001)
        os._exit(0)
        """
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", child], cwd=repo, capture_output=True)
    assert done.returncode == 0, "step 2 was never seen half-written"
    assert list(tmp_path.glob("2.orbax-checkpoint-tmp*"))

    with CheckpointManager(tmp_path) as manager:
        assert manager.latest_step() == 1
        _, _, meta = manager.restore({"w": jnp.zeros(4096)})
        assert meta["step"] == 1


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    state = {"w": jnp.ones(2)}
    with CheckpointManager(tmp_path, keep_best=1, best_metric="acc") as manager:
        with pytest.raises(TypeError, match="config must be JSON-serialisable"):
            manager.save(1, state, config={"lr": object()})
        with pytest.raises(ValueError, match="lack best_metric 'acc'"):
            manager.save(1, state, config=CONFIG, metrics={"loss": 1.0})
        assert manager.save(1, state, config=CONFIG, metrics={"acc": 1.0})
        with pytest.raises(CheckpointError, match="step 1 already exists"):
            manager.save(1, state, config=CONFIG, force=True)


def test_preemption_flag_turns_sigterm_into_a_flag() -> None:
    def previous_handler(signum: int, frame: Any) -> None:
        raise AssertionError("the flag's handler should be active")

    original = signal.signal(signal.SIGTERM, previous_handler)
    try:
        with PreemptionFlag() as preempted:
            assert not preempted()
            os.kill(os.getpid(), signal.SIGTERM)
            assert preempted()
        assert signal.getsignal(signal.SIGTERM) is previous_handler
    finally:
        signal.signal(signal.SIGTERM, original)
