"""Comparisons over several seeds, the learning-curve monitor and the low-mode methods
(tiny WRN on a 40-image class-balanced subset of real CIFAR-10, 5 steps, 64 test
images)."""

from __future__ import annotations

import json

import pytest

from sdpoint_jax.compare.registry import build_method
from sdpoint_jax.compare.run import plan_runs, run_comparison
from sdpoint_jax.compare.sdpoint import SDPointMethod
from sdpoint_jax.compare.time_to_target import setting_config
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data import pipeline
from sdpoint_jax.evaluation.evaluate import evaluate_instances
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import Run
from tests.conftest import needs_cifar10, tiny_cifar10_config

pytestmark = [needs_cifar10, pytest.mark.first]
EVAL_SPLIT = "test[:64]"


def study_config(**compare):
    config = tiny_cifar10_config(
        {
            "sdpoint.ratios": (0.5,),
            "optim.batch_size": 8,
            "optim.num_epochs": 1,  # 40 images: 5 steps
            "optim.lr_drop_epochs": (0.6, 0.8),
            "data.train_split": "train[:200]",
            "data.train_examples_per_class": 4,
            "data.augment": False,
            "data.eval_split": EVAL_SPLIT,
            "data.eval_batch_size": 32,
            "low_mode.prob": 0.5,
            "low_mode.full_epochs_after_drop": 0.0,
            "run.log_every_steps": 1,
            "run.eval_every_epochs": 0.4,  # steps 2, 4 and the end (5)
            "compare.stochastic_passes": 2,
            "compare.monitor": True,
        }
    )
    for name, value in compare.items():
        config.compare[name] = value
    return config


def log_rows(directory):
    return [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    config = study_config(
        methods=("low", "sdpoint+low"),
        seeds=(3, 1),
        single_seed_methods=("sdpoint+low",),
    )
    return workdir, config, run_comparison(config, workdir)


def test_each_seed_runs_in_its_directory_and_single_seed_methods_run_once(study):
    workdir, _, rows = study
    assert sorted(p.name for p in (workdir / "seed_3").iterdir()) == ["low", "sdpoint+low"]
    assert sorted(p.name for p in (workdir / "seed_1").iterdir()) == ["low"]
    assert {(row["method"], row["seed"]) for row in rows} == {
        ("low", 3),
        ("low", 1),
        ("sdpoint+low", 3),
    }
    for seed in (3, 1):
        written = json.loads((workdir / f"seed_{seed}" / "low" / "rows.json").read_text())
        assert written == [r for r in rows if r["method"] == "low" and r["seed"] == seed]
    first_losses = {seed: log_rows(workdir / f"seed_{seed}" / "low")[0]["loss"] for seed in (3, 1)}
    assert first_losses[3] != first_losses[1]  # seeded differently


def test_rerun_skips_every_finished_run(study):
    workdir, config, rows = study
    done = sorted(workdir.glob("seed_*/*/rows.json"))
    mtimes = [path.stat().st_mtime_ns for path in done]
    assert run_comparison(config, workdir) == rows
    assert [path.stat().st_mtime_ns for path in done] == mtimes


def test_monitor_logs_the_test_error_of_the_checkpoint_the_evaluation_reads(study):
    workdir, config, rows = study
    seeded = study_config(**{**config.compare.to_dict()})
    seeded.seed = 3
    mesh = parallel.create_mesh()
    for name in ("low", "sdpoint+low"):
        directory = workdir / "seed_3" / name
        curve = [row for row in log_rows(directory) if "eval_top1_error" in row]
        assert [row["step"] for row in curve] == [2, 4, 5]
        assert all(row["train_seconds"] > 0 for row in curve)
        method = build_method(name, seeded)
        state, _ = Run.for_trainee(method, seeded, directory, mesh).restore()
        (independent,) = evaluate_instances(
            method.model,
            state.variables,
            pipeline.eval_batches(
                "cifar10", global_batch_size=32, split=EVAL_SPLIT, data_dir=seeded.data.data_dir
            ),
            [Instance.full()],
            input_hw=(32, 32),
            bn_modes=("instance",),
        )
        assert curve[-1]["eval_top1_error"] == pytest.approx(independent["top1_error"], abs=1e-9)
        (full,) = [
            r
            for r in rows
            if (r["method"], r["curve"], r["setting"], r["seed"]) == (name, name, "full", 3)
        ]
        assert curve[-1]["eval_top1_error"] == pytest.approx(full["top1_error"], abs=1e-9)


def test_low_mode_methods_draw_as_the_training_command(study, tmp_path):
    workdir, config, rows = study
    seeded = study_config(**{**config.compare.to_dict()})
    seeded.seed = 3
    for name in ("low", "sdpoint+low"):
        trainee = Run.create(setting_config(seeded, name), tmp_path / name).trainee
        logged = [row["instance"] for row in log_rows(workdir / "seed_3" / name) if "loss" in row]
        assert logged == [str(trainee.train_setting(3, step)) for step in range(5)]
        draws = next(row["draws"] for row in log_rows(workdir / "seed_3" / name) if "draws" in row)
        assert draws["low:2"] > 0
    low = [r for r in rows if r["method"] == "low"]  # full instance only, no stochastic
    assert [r["setting"] for r in low] == ["full", "full"]
    assert {r["kind"] for r in rows if r["method"] == "sdpoint+low"} == {"setting", "stochastic"}
    assert {r["curve"] for r in rows if r["method"] == "sdpoint+low"} == {
        "sdpoint+low",
        "sdpoint+low-stochastic",
        "sdpoint+low-ubn",
    }


def test_the_ubn_curve_can_be_left_out():
    config = study_config(methods=("sdpoint",), ubn=False)
    method = build_method("sdpoint", config)
    assert {mode for _, mode in method.eval_settings()} == {"instance"}
    assert len(method.eval_settings()) == len(list(method.model.space))


def test_bad_seed_options_are_refused_before_training(tmp_path):
    with pytest.raises(
        ValueError, match=r"compare.seeds must be distinct integers >= 0, got \(1, 1\)"
    ):
        plan_runs(study_config(methods=("baseline",), seeds=(1, 1)), tmp_path)
    with pytest.raises(ValueError, match=r"single_seed_methods \['low'\] are not in"):
        plan_runs(
            study_config(methods=("baseline",), seeds=(0,), single_seed_methods=("low",)), tmp_path
        )
    with pytest.raises(ValueError, match=r"setting 'low' needs config.low_mode.prob > 0"):
        config = study_config(methods=("low",))
        config.low_mode.prob = 0.0
        plan_runs(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_study_report_summarizes_the_runs(study):
    workdir, _, rows = study
    report = json.loads((workdir / "study.json").read_text())
    (low,) = [
        r
        for r in report["table"]
        if (r["section"], r["method"], r["quantity"]) == ("top1_error", "low", "full")
    ]
    by_seed = {r["seed"]: r["top1_error"] for r in rows if r["method"] == "low"}
    assert (low["seeds"], low["values"]) == ([1, 3], [by_seed[1], by_seed[3]])
    curve = report["curves"]["sdpoint+low"]
    assert (curve["train_epochs"], curve["test_epochs"]) == ([1.0], [0.4, 0.8, 1.0])
    assert (workdir / "study.csv").is_file()
    assert (workdir / "study_curves.png").stat().st_size > 0


def test_sdpoint_monitors_its_full_instance_not_its_most_expensive_setting():
    method = SDPointMethod("wrn-10-1", 10)  # ratios 0.5 and 0.75
    last = Instance(method.model.space.num_points, 0.75)
    assert method.gflops((last, "instance"), 32) > method.gflops((Instance.full(), "instance"), 32)
    assert method.full_setting(32) == (Instance.full(), "instance")
