"""Batch-norm calibration: exact averages of batch moments, only the instance's own key."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
from flax import traverse_util

from sdpoint_jax.core.instance import FULL_KEY, Instance
from sdpoint_jax.core.norm import UNIFORM_KEY, KeyedBatchNorm
from sdpoint_jax.evaluation.calibrate import calibrate
from sdpoint_jax.models import create
from sdpoint_jax.training.parallel import create_mesh
from tests.conftest import make_batches, random_variables, record_calls

POOLED = Instance(1, 0.5)


def flat_stats(variables: dict) -> dict[tuple[str, ...], np.ndarray]:
    return {
        path: np.asarray(leaf)
        for path, leaf in traverse_util.flatten_dict(variables["batch_stats"]).items()
    }


def assert_moments(stats: dict, layer: tuple[str, ...], key: str, inputs: list) -> None:
    """Stored statistics of ``layer/key`` equal the average over ``inputs`` (one NHWC
    array per batch) of per-channel mean and unbiased variance."""
    per_batch = [np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1]) for x in inputs]
    mean = np.mean([x.mean(axis=0) for x in per_batch], axis=0)
    var = np.mean([x.var(axis=0, ddof=1) for x in per_batch], axis=0)
    np.testing.assert_allclose(stats[(*layer, key, "mean")], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats[(*layer, key, "var")], var, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
    model = create("wrn-10-1", num_classes=10)
    return model, random_variables(model, seed=1), make_batches(seed=2)


@pytest.fixture(scope="module")
def calibrated_full(setup):
    model, variables, batches = setup
    return calibrate(model, variables, batches, [Instance.full()])


@pytest.fixture(scope="module")
def calibrated_pooled(setup):
    model, variables, batches = setup
    snapshot = copy.deepcopy(flat_stats(variables))
    result = calibrate(model, variables, batches, [POOLED])
    for path, leaf in flat_stats(variables).items():
        np.testing.assert_array_equal(leaf, snapshot[path], err_msg=f"input mutated at {path}")
    return result


def test_full_key_equals_direct_moments_of_stem_output(setup, calibrated_full):
    """block1/bn1 sees the stem conv output: its 'full' statistics are computed directly."""
    _, variables, batches = setup
    kernel = variables["params"]["stem"]["kernel"]
    outputs = [
        jax.lax.conv_general_dilated(
            batch["image"],
            kernel,
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        for batch in batches
    ]
    assert_moments(flat_stats(calibrated_full), ("block1", "bn1"), FULL_KEY, outputs)


def test_instance_key_of_deep_layer_equals_direct_moments(setup, calibrated_pooled):
    """final_bn under (1, 0.5) reads key p1_r0p5; its input is recorded per batch."""
    model, variables, batches = setup
    inputs = [
        record_calls(
            model,
            variables,
            batch["image"],
            POOLED,
            KeyedBatchNorm,
            train=True,
            keep=lambda args, out: np.asarray(args[0]),
        )[-1]
        for batch in batches
    ]
    assert_moments(flat_stats(calibrated_pooled), ("final_bn",), POOLED.key, inputs)


def test_only_the_instance_key_changes(setup, calibrated_pooled):
    _, variables, _ = setup
    before, after = flat_stats(variables), flat_stats(calibrated_pooled)
    assert before.keys() == after.keys()
    own = [path for path in after if path[-2] == POOLED.key]
    assert ("block3", "bn1", POOLED.key, "mean") in own
    for path in own:
        assert not np.array_equal(after[path], before[path]), f"{path} was not recalibrated"
    untouched_keys = set()
    for path in after.keys() - set(own):
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
        untouched_keys.add(path[-2])
    # 'full' of the layers after the point and 'uniform' everywhere are among the untouched.
    assert {FULL_KEY, UNIFORM_KEY} <= untouched_keys
    assert ("block2", "bn1", FULL_KEY, "var") in after
    assert calibrated_pooled["params"] is variables["params"]


def test_recalibration_is_deterministic_and_resets_old_statistics(setup, calibrated_pooled):
    """Recalibrating reproduces the result bit for bit, even from NaN statistics."""
    model, _, batches = setup
    expected = flat_stats(calibrated_pooled)
    poisoned = {
        path: np.full_like(leaf, np.nan) if path[-2] == POOLED.key else leaf
        for path, leaf in expected.items()
    }
    start = {**calibrated_pooled, "batch_stats": traverse_util.unflatten_dict(poisoned)}
    again = calibrate(model, start, batches, [POOLED, POOLED])
    for path, leaf in flat_stats(again).items():
        np.testing.assert_array_equal(leaf, expected[path], err_msg=str(path))


def test_mesh_gives_the_same_statistics(setup, calibrated_full):
    model, variables, batches = setup
    on_mesh = calibrate(model, variables, batches, [Instance.full()], mesh=create_mesh())
    expected = flat_stats(calibrated_full)
    for path, leaf in flat_stats(on_mesh).items():
        np.testing.assert_allclose(leaf, expected[path], rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_rejects_uniform_model_foreign_instance_and_no_batches(setup):
    model, variables, batches = setup
    with pytest.raises(ValueError, match=r"bn_mode='instance'.*got bn_mode='uniform'"):
        calibrate(model.clone(bn_mode="uniform"), variables, batches, [Instance.full()])
    with pytest.raises(ValueError, match="point 4 is out of range"):
        calibrate(model, variables, batches, [Instance(4, 0.5)])
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, variables, [], [Instance.full()])
