"""The comparison harness end to end on CIFAR-10 (tiny WRN, 4 steps, 64 test images).

Real data rather than ``tfds.testing.mock_data``: the mock swaps the file system for
the whole process while a data set is opened, which races with checkpoint writes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from sdpoint_jax.compare.registry import BUILDERS, build_method
from sdpoint_jax.compare.run import _plot_title, run_comparison
from sdpoint_jax.compare.sdpoint import SDPointMethod
from sdpoint_jax.compare.trainer import Preempted, train_method
from sdpoint_jax.compare.two_phase import FineTuneMethod, phase_two_config
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.training import parallel
from sdpoint_jax.training.checkpoint import CheckpointError
from sdpoint_jax.training.loop import train
from tests.conftest import needs_cifar10, tiny_cifar10_config

EVAL_EXAMPLES = 64
# Every method but the low-mode ones (they need config.low_mode: tests/compare/test_seeds.py)
# and those that differ from a method run here only in switches of the model or its loss,
# which their own tests check both ways: the exit networks trained without Gradient
# Equilibrium (tests/models/test_early_exit.py, test_msdnet.py), the early exits with
# ISC and OFA from the start (test_early_exit.py; ee-imta runs them in its phase II) and
# stochastic depth (tests/compare/test_regularised.py). Each maps to its twin here and
# to the model fields by which the two networks differ.
TWINS = {
    "ee": ("ee-ge", ("ge",)),
    "msdnet": ("msdnet-ge", ("ge",)),
    "ee-ge-isc-ofa": ("ee-ge", ("isc",)),
    "stochastic-depth": ("dropout", ("stochastic_depth", "dropout_rate")),
}
METHODS = tuple(name for name in BUILDERS if "low" not in name and name not in TWINS)
TINY_MSDNET = "msdnet-2-ch4-gr2"  # 2 exits, 3 layers, 3 scales
pytestmark = [needs_cifar10, pytest.mark.first]


def tiny_config(methods: tuple[str, ...]):
    return tiny_cifar10_config(
        {
            "sdpoint.ratios": (0.5,),  # 4 SDPoint instances: fewer programs to compile
            "optim.batch_size": 16,
            "run.max_steps": 4,
            "run.log_every_steps": 1,
            "run.checkpoint_every_steps": 4,  # at the end only (and on SIGTERM)
            "data.eval_batch_size": 32,
            "data.eval_split": f"test[:{EVAL_EXAMPLES}]",
            "data.train_split": "train[64:1088]",
            "data.holdout_split": "train[:64]",
            "cascade.budget_points": 3,
            "compare.stochastic_passes": 3,
            "compare.msdnet": TINY_MSDNET,
            "compare.methods": methods,
            "compile.conv_lowering": "xla",  # compiles faster than matmul_grad
        },
    )


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """Every method trained, evaluated and reported in one directory: ``(workdir,
    config, rows)``. Read only: tests that rerun a method work on a copy of its
    directory."""
    workdir = tmp_path_factory.mktemp("comparison")
    config = tiny_config(METHODS)
    return workdir, config, run_comparison(config, workdir)


def test_compare_trains_evaluates_and_reports_every_method(comparison):
    workdir, config, rows = comparison
    methods = METHODS

    with open(workdir / "compare.csv") as file:
        written = list(csv.DictReader(file))
    assert len(written) == len(rows)
    assert (workdir / "compare.png").stat().st_size > 0
    for name in methods:
        method = build_method(name, config)
        method_rows = [row for row in rows if row["method"] == name and row["kind"] == "setting"]
        assert [row["setting"] for row in method_rows] == [
            method.describe(setting) for setting in method.eval_settings()
        ]
        for row in method_rows:
            assert row["examples"] == EVAL_EXAMPLES
            assert 0.0 <= row["top1_error"] <= 100.0
            assert row["gflops"] > 0
        # every method trained for the same 4 steps, checkpointed at its end
        assert sorted(p.name for p in (workdir / name / "checkpoints").iterdir()) == ["4"]
    kinds = {(row["method"], row["kind"]) for row in rows}
    stochastic = {"sdpoint", "dropout"}
    assert {m for m, kind in kinds if kind == "stochastic"} == stochastic
    exits = {"ee-ge", "ee-imta", "msdnet-ge", "msdnet-imta"}
    assert {m for m, kind in kinds if kind == "budgeted"} == exits
    for row in rows:
        if row["kind"] == "budgeted":  # average cost between the first and the last exit
            ee = build_method(row["method"], config).exit_gflops(32)
            assert ee[0] <= row["gflops"] <= ee[-1]
    sdpoint = [row for row in rows if row["method"] == "sdpoint" and row["kind"] == "setting"]
    assert {row["curve"] for row in sdpoint} == {"sdpoint", "sdpoint-ubn"}
    assert len(sdpoint) == 2 * len(list(build_method("sdpoint", config).model.space))
    (baseline,) = [r for r in rows if r["method"] == "baseline" and r["kind"] == "setting"]
    assert baseline["setting"] == str(Instance.full())
    for name, (twin_name, fields) in TWINS.items():  # the trained twin's network and settings
        method, twin = build_method(name, config), build_method(twin_name, config)
        assert all(getattr(method.model, f) != getattr(twin.model, f) for f in fields)
        assert method.model.clone(**{f: getattr(twin.model, f) for f in fields}) == twin.model
        assert method.eval_settings() == twin.eval_settings()
    ee_all, ee_ge = build_method("ee-ge-isc-ofa", config), build_method("ee-ge", config)
    assert ee_all.ofa and not ee_ge.ofa  # and the one-for-all loss


def test_rerun_skips_finished_methods(comparison, tmp_path):
    finished, _, all_rows = comparison
    shutil.copytree(finished / "baseline", tmp_path / "baseline")  # as the first run left it
    first = [row for row in all_rows if row["method"] == "baseline"]
    config = tiny_config(("baseline",))
    rows_file = tmp_path / "baseline" / "rows.json"
    assert first and json.loads(rows_file.read_text()) == first
    mtime = rows_file.stat().st_mtime_ns
    assert run_comparison(config, tmp_path) == first
    assert rows_file.stat().st_mtime_ns == mtime


def test_the_plot_title_names_every_network_that_ran():
    config = tiny_config(("sdpoint", "ee", "msdnet-imta"))
    methods = [build_method(name, config) for name in config.compare.methods]
    assert _plot_title(config, methods) == f"wrn-10-1 and {TINY_MSDNET} on cifar10"
    assert _plot_title(config, methods[:2]) == "wrn-10-1 on cifar10"


def test_unknown_method_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"unknown comparison method 'nope'; choose from"):
        run_comparison(tiny_config(("baseline", "nope")), tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_comparison_trains_sdpoint_exactly_as_the_training_command(comparison, tmp_path):
    finished, _, _ = comparison
    config = tiny_config(("sdpoint",))
    method = build_method("sdpoint", config)
    shutil.copytree(finished / "sdpoint", tmp_path / "compare")  # trained to the end: restored
    compared = train_method(method, config, tmp_path / "compare", parallel.create_mesh())
    trained = train(config, tmp_path / "train", resume=False)
    assert int(trained.step) == config.run.max_steps
    for a, b in zip(jax.tree.leaves(compared), jax.tree.leaves(trained.variables), strict=True):
        np.testing.assert_array_equal(a, b)


class SigtermAtStep(SDPointMethod):
    """``method`` (SDPoint) that sends this process SIGTERM when drawing the setting of
    ``step``."""

    def __init__(self, step: int, method: SDPointMethod):
        vars(self).update(vars(method))  # the same model, bn modes and name
        self.stop_step = step

    def train_setting(self, seed, step):
        if step == self.stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_setting(seed, step)


def test_sigterm_saves_and_a_rerun_resumes_exactly(comparison, tmp_path):
    finished, _, _ = comparison
    config = tiny_config(("sdpoint",))
    mesh = parallel.create_mesh()
    method = build_method("sdpoint", config)
    # the uninterrupted run: the comparison's SDPoint, trained to the end with this config
    shutil.copytree(finished / "sdpoint", tmp_path / "reference")
    reference = train_method(method, config, tmp_path / "reference", mesh)
    with pytest.raises(Preempted, match="SIGTERM: saved sdpoint at step 3"):
        train_method(SigtermAtStep(2, method), config, tmp_path / "resumed", mesh)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["3"]
    resumed = train_method(method, config, tmp_path / "resumed", mesh)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


# --- IMTA's two phases (phase I: msdnet-ge; phase II: msdnet-imta) ----------------------


def _copy_phases(finished, tmp_path, *names):
    for name in names:
        shutil.copytree(finished / name, tmp_path / name)


def test_phase_two_changes_only_the_classifiers_last_layers(comparison, tmp_path):
    finished, config, _ = comparison
    _copy_phases(finished, tmp_path, "msdnet-ge", "msdnet-imta")
    mesh = parallel.create_mesh()
    method = build_method("msdnet-imta", config)
    second = train_method(method, config, tmp_path / "msdnet-imta", mesh)  # restores
    first = train_method(method.phase_one, config, tmp_path / "msdnet-ge", mesh)
    mask = method.trainable(first["params"])
    trained = [on for on in jax.tree.leaves(mask) if on]
    assert len(trained) == 2 * method.num_exits  # kernel and bias of each exit's linear
    flat_first = jax.tree_util.tree_flatten_with_path(first)[0]
    flat_second = jax.tree.leaves(second)
    changed = []
    for (path, a), b in zip(flat_first, flat_second, strict=True):
        if np.array_equal(a, b):
            continue
        changed.append(jax.tree_util.keystr(path))
    assert sorted(changed) == sorted(
        f"['params']['exit{i}']['linear']['{leaf}']"
        for i in range(1, method.num_exits + 1)
        for leaf in ("bias", "kernel")
    )


class SigtermFineTune(FineTuneMethod):
    """A phase II that sends this process SIGTERM when drawing the setting of ``step``."""

    def __init__(self, step: int, method: FineTuneMethod):
        vars(self).update(vars(method))
        self.stop_step = step

    def train_setting(self, seed, step):
        if step == self.stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_setting(seed, step)


def test_phase_two_resumes_exactly(comparison, tmp_path):
    finished, config, _ = comparison
    _copy_phases(finished, tmp_path, "msdnet-ge")
    mesh = parallel.create_mesh()
    method = build_method("msdnet-imta", config)
    with pytest.raises(Preempted, match="SIGTERM: saved msdnet-imta at step 3"):
        train_method(SigtermFineTune(2, method), config, tmp_path / "msdnet-imta", mesh)
    assert [p.name for p in (tmp_path / "msdnet-imta" / "checkpoints").iterdir()] == ["3"]
    resumed = train_method(method, config, tmp_path / "msdnet-imta", mesh)
    _copy_phases(finished, tmp_path / "reference", "msdnet-ge", "msdnet-imta")
    reference = train_method(method, config, tmp_path / "reference" / "msdnet-imta", mesh)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_phase_two_refuses_a_phase_one_of_another_architecture(comparison, tmp_path):
    finished, _, _ = comparison
    _copy_phases(finished, tmp_path, "msdnet-ge")
    other = tiny_config(("msdnet-imta",))
    other.compare.msdnet = "msdnet-2-ch4-gr4"
    with pytest.raises(
        CheckpointError,
        match=r"compare\.msdnet: 'msdnet-2-ch4-gr2' \(phase I\) vs 'msdnet-2-ch4-gr4'",
    ):
        train_method(
            build_method("msdnet-imta", other),
            other,
            tmp_path / "msdnet-imta",
            parallel.create_mesh(),
        )
    assert not (tmp_path / "msdnet-imta").exists()


def test_two_phase_names_follow_the_ablation_switches():
    config = tiny_config(("msdnet-imta",))
    config.compare.imta_isc = False
    method = build_method("msdnet-imta", config)
    assert (method.name, method.phase_one.name) == ("msdnet-ge-then-ofa", "msdnet-ge")
    assert method.ofa and not method.model.isc and method.phase_one.model.ge
    config.compare.imta_ge = False
    assert build_method("msdnet-imta", config).phase_one.name == "msdnet"
    assert build_method("ee-imta", tiny_config(("ee-imta",))).phase_one.name == "ee-ge"
    assert phase_two_config(config).optim.num_epochs == config.finetune.num_epochs
