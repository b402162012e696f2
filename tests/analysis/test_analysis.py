"""The paper's analyses: scale sensitivity (pairwise cosine, zoom) and cost-dependent
difficulty (cheapest correct instance), unit-tested and run end to end through the
command line on tiny WRN-10-1 runs trained a step or two on mocked CIFAR-10."""

from __future__ import annotations

import csv
import itertools
import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sdpoint_jax.analysis import analysis_batches
from sdpoint_jax.analysis.__main__ import main
from sdpoint_jax.analysis.difficulty import (
    DIFFICULTY_CSV,
    DIFFICULTY_PNG,
    NONE_CORRECT,
    cheapest_correct,
)
from sdpoint_jax.analysis.scale import (
    DEFAULT_FACTORS,
    SCALE_CSV,
    SCALE_PNG,
    mean_pairwise_cosine,
    per_image_pairwise_cosine,
    rescale_images,
)
from sdpoint_jax.config import load_config
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training.loop import train
from sdpoint_jax.training.run import restore_for_evaluation

# ------------------------------------------------------------------ pairwise cosine


def random_probs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=shape)
    return np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)


def test_identical_probabilities_have_cosine_one():
    probs = np.broadcast_to(random_probs((5, 10), seed=0), (7, 5, 10))
    assert mean_pairwise_cosine(probs) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(per_image_pairwise_cosine(probs), 1.0, atol=1e-12)


def test_cosine_equals_hand_computed_value():
    """Image 0 at 3 scales: (1, 0), (0, 1), (0.5, 0.5); pairs: 0, 1/sqrt 2, 1/sqrt 2.
    Image 1: the same vector at every scale, cosine 1."""
    probs = np.array([[[1.0, 0.0], [0.3, 0.7]], [[0.0, 1.0], [0.3, 0.7]], [[0.5, 0.5], [0.3, 0.7]]])
    per_image = per_image_pairwise_cosine(probs)
    np.testing.assert_allclose(per_image, [np.sqrt(2) / 3, 1.0], rtol=1e-12)
    assert mean_pairwise_cosine(probs) == pytest.approx((np.sqrt(2) / 3 + 1) / 2, rel=1e-12)


def test_cosine_is_symmetric_in_scale_order():
    probs = random_probs((7, 6, 10), seed=1)
    expected = per_image_pairwise_cosine(probs)
    assert np.all((expected > 0) & (expected < 1))
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(7)
        np.testing.assert_allclose(per_image_pairwise_cosine(probs[order]), expected, rtol=1e-12)
    pairs = [
        np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        for a, b in itertools.combinations(probs, 2)
    ]
    assert mean_pairwise_cosine(probs) == pytest.approx(np.mean(pairs), rel=1e-12)


def test_cosine_needs_two_scales_and_nonzero_vectors():
    with pytest.raises(ValueError, match="scales >= 2"):
        mean_pairwise_cosine(random_probs((1, 3, 4), seed=0))
    with pytest.raises(ValueError, match="non-zero"):
        mean_pairwise_cosine(np.zeros((2, 1, 3)))


# ------------------------------------------------------------------------- zoom


def test_paper_factors_are_precrop_sizes_over_256():
    assert np.allclose(DEFAULT_FACTORS, np.arange(256, 353, 16) / 256)
    assert len(DEFAULT_FACTORS) == 7


def test_rescale_factor_one_is_identity_and_shape_is_kept():
    images = jax.random.normal(jax.random.key(0), (3, 12, 10, 3))
    np.testing.assert_array_equal(rescale_images(images, 1.0), images)
    for factor in (*DEFAULT_FACTORS, 0.75, 1.5):
        zoomed = rescale_images(images, factor)
        assert zoomed.shape == images.shape and zoomed.dtype == images.dtype
    jitted = jax.jit(rescale_images, static_argnums=1)
    np.testing.assert_allclose(jitted(images, 1.375), rescale_images(images, 1.375), atol=1e-6)


def test_rescale_zooms_into_the_centre():
    """Zoom 2 shows the central half upscaled: away from its border (where the crop
    alone would clamp) it equals resizing the central half to the full size."""
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    centre = jax.image.resize(images[:, 4:12, 4:12], images.shape, "bilinear")
    zoomed = rescale_images(images, 2.0)
    np.testing.assert_allclose(zoomed[:, 1:-1, 1:-1], centre[:, 1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize("factor", [1.375, 0.75])
def test_rescale_commutes_with_normalisation(factor):
    """Resizing, cropping and edge padding commute with per-channel affine maps."""
    raw = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), maxval=255.0)
    mean, std = jnp.array([125.3, 123.0, 113.9]), jnp.array([63.0, 62.1, 66.7])
    np.testing.assert_allclose(
        rescale_images((raw - mean) / std, factor),
        (rescale_images(raw, factor) - mean) / std,
        atol=1e-4,
    )


def test_rescale_rejects_bad_factors():
    images = jnp.zeros((1, 8, 8, 3))
    for factor in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            rescale_images(images, factor)
    with pytest.raises(ValueError, match="to nothing"):
        rescale_images(images, 0.01)


# ----------------------------------------------------------------- cheapest correct


def brute_force_cheapest(correct: np.ndarray, gflops: np.ndarray) -> np.ndarray:
    result = []
    for column in correct.T:
        candidates = [(gflops[i], i) for i in range(len(gflops)) if column[i]]
        result.append(min(candidates)[1] if candidates else -1)
    return np.array(result)


@pytest.mark.parametrize("seed", range(5))
def test_cheapest_correct_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    instances, images = 7, 200
    correct = rng.random((instances, images)) < rng.uniform(0.05, 0.5)
    gflops = rng.choice([0.5, 1.0, 1.5, 2.0], size=instances)  # with ties
    expected = brute_force_cheapest(correct, gflops)
    assert (expected == NONE_CORRECT).any() and (expected != NONE_CORRECT).any()
    np.testing.assert_array_equal(cheapest_correct(correct, gflops), expected)


def test_cheapest_correct_edge_cases():
    gflops = np.array([3.0, 1.0, 2.0])
    correct = np.array([[True, False, False], [False, False, True], [True, False, True]])
    np.testing.assert_array_equal(cheapest_correct(correct, gflops), [2, -1, 1])
    assert cheapest_correct(np.zeros((3, 0), bool), gflops).shape == (0,)
    with pytest.raises(ValueError, match=r"\(instances, images\)"):
        cheapest_correct(correct, gflops[:2])


# -------------------------------------------------------------- end to end (CLI)

NUM_MOCK_EXAMPLES = 20  # per split, random images and labels
IMAGES = 12  # analysed test images: one full batch of 8 and 4 of the next
CONFIG_FILE = textwrap.dedent(
    """
    from sdpoint_jax.config import cifar_config


    def get_config(variant=None):
        config = cifar_config("wrn-10-1", "cifar10", variant=variant)
        config.optim.batch_size = 8
        config.data.eval_batch_size = 8
        config.run.max_steps = 1
        config.run.log_every_steps = 1
        config.run.eval_every_epochs = 1000.0
        config.compile.cache_dir = {cache!r}
        return config
    """
)


@pytest.fixture(scope="module")
def mocked_cifar():
    """Every CIFAR-10 split holds the same NUM_MOCK_EXAMPLES random examples."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        with tfds.testing.mock_data(
            num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
        ):
            yield


@pytest.fixture(scope="module")
def runs(mocked_cifar, tmp_path_factory, compilation_cache_dir) -> dict[str, tuple[str, Path]]:
    """An SDPoint and a baseline run, one training step each (a trained run's workdir is
    what matters here, not its accuracy): ``name -> (config spec, workdir)``."""
    root = tmp_path_factory.mktemp("runs")
    config_file = root / "tiny.py"
    config_file.write_text(CONFIG_FILE.format(cache=str(compilation_cache_dir)))
    made = {}
    for name, spec in (("sdpoint", str(config_file)), ("baseline", f"{config_file}:baseline")):
        train(load_config(spec), root / name, resume=False)
        made[name] = (spec, root / name)
    return made


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_scale_command_writes_one_row_per_run(runs, tmp_path):
    (sdpoint_config, sdpoint_dir), (baseline_config, baseline_dir) = runs.values()
    argv = ["scale", "--out", str(tmp_path), "--images", str(IMAGES)]
    argv += ["--config", sdpoint_config, "--workdir", str(sdpoint_dir), "--label", "SDPoint"]
    argv += ["--config", baseline_config, "--workdir", str(baseline_dir), "--label", "base"]
    main(argv)
    table = read_csv(tmp_path / SCALE_CSV)
    assert [(row["label"], row["sdpoint"]) for row in table] == [
        ("SDPoint", "True"),
        ("base", "False"),
    ]
    factors = [float(factor) for factor in table[0]["factors"].split()]
    np.testing.assert_allclose(factors, DEFAULT_FACTORS)
    for row in table:
        assert int(row["images"]) == IMAGES
        accuracies = [float(row[f"top1_accuracy@{factor:g}"]) for factor in DEFAULT_FACTORS]
        hits = [a * IMAGES / 100 for a in accuracies]  # whole numbers of images
        assert hits == pytest.approx(np.round(hits)) and all(0 <= h <= IMAGES for h in hits)
    assert (tmp_path / SCALE_PNG).read_bytes().startswith(b"\x89PNG")

    # The score equals a direct computation of the paper's mean on the same 12 images.
    run, state, _ = restore_for_evaluation(load_config(sdpoint_config), sdpoint_dir)
    batches = list(analysis_batches(run, IMAGES))
    images = np.concatenate([batch["image"][batch["mask"] > 0] for batch in batches])
    assert len(images) == IMAGES
    probs = np.stack(
        [
            jax.nn.softmax(
                run.model.apply(
                    state.variables,
                    rescale_images(jnp.asarray(images), factor),
                    instance=Instance.full(),
                    train=False,
                )
            )
            for factor in DEFAULT_FACTORS
        ]
    )
    assert float(table[0]["mean_cosine"]) == pytest.approx(mean_pairwise_cosine(probs), abs=1e-5)


def test_difficulty_command_groups_every_image_by_cheapest_correct_instance(runs, tmp_path):
    config_spec, workdir = runs["sdpoint"]
    argv = ["difficulty", "--config", config_spec, "--workdir", str(workdir)]
    result = main([*argv, "--out", str(tmp_path), "--images", str(IMAGES), "--examples", "3"])
    table = read_csv(tmp_path / DIFFICULTY_CSV)
    assert [int(row["index"]) for row in table] == list(range(IMAGES))

    run, _, _ = restore_for_evaluation(load_config(config_spec), workdir)
    labels = np.concatenate(
        [batch["label"][batch["mask"] > 0] for batch in analysis_batches(run, IMAGES)]
    )
    assert [int(row["label"]) for row in table] == labels.tolist()
    assert result.instances == tuple(run.model.space) and len(result.instances) == 7
    flops = {str(i): count_flops(run.model, i, (32, 32)) / 1e9 for i in result.instances}
    full = result.instances.index(Instance.full())
    for index, row in enumerate(table):
        correct = result.correct[:, index]
        assert row["full_correct"] == str(bool(correct[full]))
        if row["instance"] == "none":
            assert not correct.any() and row["gflops"] == ""
            continue
        chosen = result.instances.index(Instance.parse(row["instance"]))
        assert correct[chosen]
        assert float(row["gflops"]) == pytest.approx(flops[row["instance"]])
        assert result.gflops[chosen] <= min(result.gflops[correct])  # unrounded: the cheapest
    sizes = dict(result.groups())
    assert sum(sizes.values()) == IMAGES
    assert sizes[NONE_CORRECT] == sum(row["instance"] == "none" for row in table)
    for group, kept in result.examples.items():
        assert len(kept) == min(3, sizes[group])
        assert all(result.cheapest[index] == group for index, _ in kept)
    assert (tmp_path / DIFFICULTY_PNG).read_bytes().startswith(b"\x89PNG")


def _error(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and the one stderr line of ``main(argv)``, which must exit."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return exit_info.value.code, error


def test_commands_name_missing_paths(runs, tmp_path, capsys):
    config_spec, workdir = runs["sdpoint"]
    missing = tmp_path / "never_trained"
    argv = ["difficulty", "--config", config_spec, "--workdir", str(missing), "--out", "x"]
    status, error = _error(argv, capsys)
    assert status == 1 and f"no trained run in {missing}" in error
    argv = ["scale", "--config", "/no/such.py", "--workdir", str(workdir), "--out", "x"]
    status, error = _error(argv, capsys)
    assert status == 1 and re.search(r"config file /no/such\.py does not exist", error)
    # usage errors: two labels for one workdir, a flag of the other command, two runs
    # for difficulty
    scale = ["scale", "--config", config_spec, "--workdir", str(workdir), "--out", "x"]
    status, error = _error([*scale, "--label", "a", "--label", "b"], capsys)
    assert status == 2 and "give one --label per --workdir (1), or none" in error
    status, error = _error([*scale, "--top-k", "2"], capsys)
    assert status == 2 and "--top-k applies to difficulty only, not to scale" in error
    status, error = _error([*scale, "--factors", "1,x"], capsys)
    assert status == 2 and "flag --factors=1,x: expected comma-separated numbers" in error
    difficulty = ["difficulty", *scale[1:], "--workdir", str(workdir)]
    status, error = _error(difficulty, capsys)
    assert status == 2 and "difficulty takes one --config and one --workdir" in error
