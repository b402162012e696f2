"""A run directory written by the version with the flat config (``tests/data/legacy_run``,
see its README.md) is read, calibrated, evaluated, exported and resumed by this one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from sdpoint_jax.config import config_from_saved, is_legacy
from sdpoint_jax.deploy.artifacts import run_config
from sdpoint_jax.deploy.loader import load_exported
from sdpoint_jax.evaluation.workflow import calibrate_run, evaluate_run
from sdpoint_jax.export import main as export_main
from sdpoint_jax.training.checkpoint import CheckpointError, CheckpointManager
from sdpoint_jax.training.loop import train
from sdpoint_jax.training.programs import enable_compilation_cache
from sdpoint_jax.training.run import Run
from tests.conftest import SHARED_DATA_DIR, needs_cifar10

LEGACY_RUN = Path(__file__).resolve().parent / "data" / "legacy_run"
SAVED_STEP = 6  # the old run stopped there (its max_steps), 2 steps before its end

pytestmark = needs_cifar10


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A copy of the legacy run (the tests write into it)."""
    enable_compilation_cache(tmp_path / "cache")
    return Path(shutil.copytree(LEGACY_RUN, tmp_path / "run"))


def legacy_config(workdir: Path):
    return run_config(workdir, None, str(SHARED_DATA_DIR))


def test_saved_flat_config_is_read_nested(workdir):
    with CheckpointManager(workdir / "checkpoints") as manager:
        saved = manager.saved_config()
    assert is_legacy(saved) and saved["batch_size"] == 64  # the old, flat layout
    config = legacy_config(workdir)
    assert config.model.name == "wrn-10-1" and config.data.dataset == "cifar10"
    assert config.data.train_split == "train[:256]" and config.data.eval_split == "test[:256]"
    assert config.optim.batch_size == 64 and config.optim.num_epochs == 2
    assert config.optim.lr_drop_epochs == (1.0, 1.5)
    assert config.sdpoint.enabled is True and config.sdpoint.calibration_batches == 2
    assert config.run.max_steps == SAVED_STEP and config.run.keep_checkpoints == 1
    assert config.compile.precompile is False
    assert config.data.data_dir == str(SHARED_DATA_DIR)
    # the old checkpoint already held every field of today's layout but the optional group
    assert config.to_dict().keys() == config_from_saved({}).to_dict().keys()


@pytest.mark.slow
def test_calibrate_then_evaluate_reproduces_the_old_results(workdir):
    expected = json.loads((workdir / "results.json").read_text())
    config = legacy_config(workdir)
    calibrated = calibrate_run(config, workdir)
    assert int(calibrated.step) == SAVED_STEP
    with CheckpointManager(workdir / "calibrated") as manager:
        assert manager.latest_step() == SAVED_STEP
        assert not is_legacy(manager.saved_config())  # written nested now
    rows = evaluate_run(config, workdir)
    key = ("bn_mode", "point", "ratio")
    assert [tuple(r[k] for k in key) for r in rows] == [tuple(r[k] for k in key) for r in expected]
    for row, old in zip(rows, expected, strict=True):
        assert row["examples"] == old["examples"] == 256
        for field in ("top1_error", "top5_error", "gflops"):
            assert row[field] == pytest.approx(old[field], abs=1e-6), (field, row)


@pytest.mark.slow
def test_export_lists_the_instances_and_leaves_errors_of_unknown_step_out(
    workdir, tmp_path, capsys
):
    out = tmp_path / "export"
    manifest = export_main(
        ["--workdir", str(workdir), "--instances", "full,2:0.5", "--out", str(out)]
        + ["--platforms", "cpu", "--data-dir", str(SHARED_DATA_DIR)]
    )
    assert manifest["model"] == "wrn-10-1" and manifest["step"] == SAVED_STEP
    assert [i["name"] for i in manifest["instances"]] == ["2:0.5", "full"]  # cheapest first
    # The old results.json records neither its step nor its statistics (they were the
    # calibrated ones; the run directory keeps no calibration, so the export has the
    # running averages): its errors are not attached, and the note says why.
    assert isinstance(json.loads((workdir / "results.json").read_text()), list)
    assert manifest["statistics"] == "running-average"
    assert all(i["top1_error"] is None for i in manifest["instances"])
    assert "records no step" in capsys.readouterr().out
    loaded = load_exported(out)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    logits = loaded.logits(images, "full")
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


@pytest.mark.slow
def test_resume_trains_one_more_step(workdir):
    config = legacy_config(workdir)
    saved_state, saved_draws = Run.create(config, workdir).restore()
    config.run.max_steps = SAVED_STEP + 1
    state = train(config, workdir, resume=True)
    assert int(state.step) == SAVED_STEP + 1
    _, draws = Run.create(config, workdir).restore()
    assert sum(int(v) for v in draws.values()) == sum(int(v) for v in saved_draws.values()) + 1
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(saved_state.params), strict=True
        )
    ]
    assert any(moved)
    with CheckpointManager(workdir / "checkpoints") as manager:
        assert manager.latest_step() == SAVED_STEP + 1
        assert not is_legacy(manager.saved_config())


def test_resume_invariants_are_checked_against_the_migrated_config(workdir):
    config = legacy_config(workdir)
    config.optim.batch_size = 32
    config.sdpoint.enabled = False
    with pytest.raises(
        CheckpointError,
        match=r"different config \(sdpoint\.enabled: True -> False, optim\.batch_size: 64 -> 32\)",
    ):
        Run.create(config, workdir).restore()
