"""Export: every exported instance and every level of the switchable function gives
the in-process model's logits; the manifest and loader round trip; the CLI exports a
trained run from its saved config."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data.specs import SPECS
from sdpoint_jax.deploy.artifacts import (
    export_instance,
    export_switchable,
    measured_errors,
    write_export,
)
from sdpoint_jax.deploy.loader import load_exported
from sdpoint_jax.deploy.platforms import check_platforms
from sdpoint_jax.evaluation.evaluate import write_results
from sdpoint_jax.export import main
from sdpoint_jax.models import create
from sdpoint_jax.training.run_dir import RunDir, Source
from tests.conftest import TRAINED_STEPS, needs_cifar10, tiny_config

SPEC = SPECS["cifar10"]
INSTANCES = [Instance.full(), Instance(1, 0.5), Instance(2, 0.75)]


@pytest.fixture(scope="module")
def model_and_variables():
    """A small WRN with random parameters and random, different statistics per instance."""
    model = create("wrn-10-1", num_classes=10)
    variables = model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), instance=Instance.full(), train=False
    )
    leaves, treedef = jax.tree.flatten(variables["batch_stats"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    stats = [
        jnp.abs(leaf + jax.random.normal(k, leaf.shape))
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return model, {**variables, "batch_stats": jax.tree.unflatten(treedef, stats)}


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, 32, 32, 3)).astype(np.float32)


def reference_logits(model, variables, instance: Instance, images: np.ndarray) -> np.ndarray:
    normalised = (images - np.asarray(SPEC.mean, np.float32)) / np.asarray(SPEC.std, np.float32)
    return np.asarray(model.apply(variables, normalised, instance=instance, train=False))


def test_exported_instance_equals_apply_for_any_batch_size(model_and_variables):
    model, variables = model_and_variables
    for instance in INSTANCES:
        exported = export_instance(model, variables, instance, SPEC, platforms=("cpu",))
        restored = jax.export.deserialize(exported.serialize())
        for batch in (1, 5):
            images = pixels(batch)
            np.testing.assert_allclose(
                np.asarray(restored.call(images)),
                reference_logits(model, variables, instance, images),
                rtol=1e-5,
                atol=1e-5,
            )


def test_instances_differ_so_equality_is_per_instance(model_and_variables):
    model, variables = model_and_variables
    images = pixels(4)
    full, cheap = (reference_logits(model, variables, i, images) for i in INSTANCES[:2])
    assert np.abs(full - cheap).max() > 1e-3


def test_switchable_level_selects_each_instance(model_and_variables):
    model, variables = model_and_variables
    exported = export_switchable(model, variables, INSTANCES, SPEC, platforms=("cpu",))
    restored = jax.export.deserialize(exported.serialize())
    images = pixels(3, seed=1)
    for level, instance in enumerate(INSTANCES):
        np.testing.assert_allclose(
            np.asarray(restored.call(images, np.int32(level))),
            reference_logits(model, variables, instance, images),
            rtol=1e-5,
            atol=1e-5,
        )


def test_write_and_load_round_trip(model_and_variables, tmp_path):
    model, variables = model_and_variables
    out = tmp_path / "export"
    errors = {Instance(1, 0.5): {"top1_error": 50.0, "top5_error": 10.0, "evaluated_examples": 7}}
    manifest = write_export(
        out,
        model,
        variables,
        INSTANCES,
        SPEC,
        platforms=("cpu",),
        info={"model": "wrn-10-1", "step": 3},
        errors=errors,
    )
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not (tmp_path / "export.partial").exists()
    loaded = load_exported(out)
    assert loaded.instances == ("1:0.5", "2:0.75", "full")  # cheapest first
    gflops = [loaded.gflops(name) for name in loaded.instances]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]
    by_name = {entry["name"]: entry for entry in manifest["instances"]}
    assert by_name["1:0.5"]["top1_error"] == 50.0 and by_name["full"]["top1_error"] is None
    assert manifest["switchable"]["levels"] == list(loaded.instances)
    assert manifest["input"]["shape"] == [None, 32, 32, 3]
    images = pixels(2, seed=2)
    for level, name in enumerate(loaded.instances):
        expected = reference_logits(model, variables, Instance.parse(name), images)
        np.testing.assert_allclose(loaded.logits(images, name), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            loaded.logits_at_level(images, level), expected, rtol=1e-5, atol=1e-5
        )

    with pytest.raises(ValueError, match=r"level 3 is out of range: this export has levels 0\.\.2"):
        loaded.logits_at_level(images, 3)
    with pytest.raises(ValueError, match=r"instance '2:0\.5' was not exported"):
        loaded.logits(images, "2:0.5")
    with pytest.raises(
        ValueError, match=r"images must be \(batch, 32, 32, 3\).*got shape \(2, 32, 3\)"
    ):
        loaded.logits(images[:, 0], "full")
    with pytest.raises(FileExistsError, match="already exists"):
        write_export(out, model, variables, INSTANCES, SPEC, platforms=("cpu",), info={}, errors={})
    with pytest.raises(FileNotFoundError, match="no exported model in"):
        load_exported(tmp_path / "nothing")


def test_platforms_are_checked():
    assert check_platforms("cpu, cuda,cpu") == ("cpu", "cuda")
    with pytest.raises(ValueError, match=r"subset of .* got 'gpu'"):
        check_platforms("gpu")


@needs_cifar10
def test_cli_exports_a_trained_run_from_its_saved_config(trained_run, tmp_path, capsys):
    from sdpoint_jax.training.run import Run

    workdir = trained_run.workdir  # read only: the export goes to its own directory
    out = tmp_path / "export"
    manifest = main(
        ["--workdir", str(workdir), "--instances", "full,2:0.5", "--out", str(out)]
        + ["--platforms", "cpu"]
    )
    assert manifest["step"] == TRAINED_STEPS and manifest["model"] == "wrn-10-1"
    assert manifest["statistics"] == "running-average"
    assert "results.json does not exist" in capsys.readouterr().out
    assert all(entry["top1_error"] is None for entry in manifest["instances"])
    loaded = load_exported(out)
    model = Run.create(tiny_config(TRAINED_STEPS), workdir).model
    images = pixels(3, seed=3)
    for name in ("full", "2:0.5"):
        np.testing.assert_allclose(
            loaded.logits(images, name),
            reference_logits(model, trained_run.state.variables, Instance.parse(name), images),
            rtol=1e-5,
            atol=1e-5,
        )

    with pytest.raises(SystemExit):
        main(["--workdir", str(workdir), "--out", str(out), "--platforms", "cpu"])
    assert "already exists" in capsys.readouterr().err

    # errors come from results.json when it records the exported step and statistics
    run_dir, source = RunDir(workdir), Source(2, "running-average")
    full, cheap = Instance.full(), Instance(2, 0.5)
    rows = [
        {"point": 0, "ratio": 1.0, "top1_error": 40.0, "top5_error": 5.0, "examples": 16}
        | {"bn_mode": mode}
        for mode in ("instance", "uniform")
    ]
    rows[1]["top1_error"] = 45.0
    write_results(rows, workdir, source)
    expected = {full: {"top1_error": 40.0, "top5_error": 5.0, "evaluated_examples": 16}}
    assert measured_errors(run_dir, [full, cheap], "instance", source) == expected
    assert measured_errors(run_dir, [full], "uniform", source)[full]["top1_error"] == 45.0
    assert capsys.readouterr().out == ""
    calibrated = Source(2, "calibrated")
    assert measured_errors(run_dir, [full], "instance", calibrated) == {}
    assert "results.json is of step 2 with running-average statistics, the export is of " in (
        capsys.readouterr().out
    )
    run_dir.results_json.write_text(json.dumps(rows))  # as an earlier version wrote it
    assert measured_errors(run_dir, [full], "instance", source) == {}
    assert "results.json records no step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert "no trained run in" in capsys.readouterr().err
