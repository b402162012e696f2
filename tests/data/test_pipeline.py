"""Tests of the tf.data input pipelines (mocked CIFAR-100/ImageNet, real CIFAR-10 if present)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sdpoint_jax.data import pipeline
from sdpoint_jax.data import specs as datasets
from tests.conftest import SHARED_DATA_DIR, needs_cifar10

NUM_MOCK_EXAMPLES = 20
BATCH = 4  # -> 5 steps per epoch on the mocked splits


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every tfds split holds the same NUM_MOCK_EXAMPLES random examples, 'prepared'."""
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(
        num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        yield


def stored_examples(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The mocked split as stored: uint8 images ``[N, H, W, 3]`` and labels ``[N]``."""
    examples = list(tfds.as_numpy(tfds.load(name, split="train")))
    return np.stack([ex["image"] for ex in examples]), np.array([ex["label"] for ex in examples])


def unnormalise(images: np.ndarray, name: str) -> np.ndarray:
    """Undoes the per-channel normalisation: back to 0-255 units."""
    spec = pipeline.dataset_spec(name)
    return images * np.array(spec.std, np.float32) + np.array(spec.mean, np.float32)


def take(batches: Iterator[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(batches, count))


def assert_same_batches(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def padded_crop_index(image: np.ndarray, originals: np.ndarray, pad: int = 4) -> int | None:
    """Index of the original of which ``image`` is a zero-padded crop, possibly flipped."""
    size = image.shape[0]
    padded = np.pad(originals, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    for candidate in (image, image[:, ::-1]):
        for dy, dx in itertools.product(range(2 * pad + 1), repeat=2):
            windows = padded[:, dy : dy + size, dx : dx + size]
            hits = np.flatnonzero((windows == candidate).all(axis=(1, 2, 3)))
            if hits.size:
                return int(hits[0])
    return None


# --------------------------------------------------------------------------------------
# Specs and argument checking.


def test_dataset_spec() -> None:
    spec = pipeline.dataset_spec("cifar100")
    assert (spec.num_classes, spec.image_size, spec.eval_split) == (100, 32, "test")
    assert pipeline.dataset_spec("imagenet2012").image_size == 224
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_classes = 5  # type: ignore[misc]


def test_unknown_dataset_name_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'mnist'.*cifar10, cifar100, imagenet2012"):
        pipeline.dataset_spec("mnist")
    with pytest.raises(ValueError, match="mnist"):
        pipeline.train_batches("mnist", global_batch_size=8, seed=0)


def test_num_examples_comes_from_the_prepared_data(mocked: None) -> None:
    assert pipeline.num_examples("cifar100", "test") == NUM_MOCK_EXAMPLES


def test_global_batch_must_split_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match=r"global_batch_size 8 .* processes 3"):
        pipeline.train_batches("cifar100", global_batch_size=8, seed=0)


def test_each_process_reads_its_share_of_the_global_batch(
    mocked: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    batch = next(pipeline.train_batches("cifar100", global_batch_size=8, seed=0))
    assert batch["image"].shape == (4, 32, 32, 3)
    evaluation = next(pipeline.eval_batches("cifar100", global_batch_size=8))
    assert evaluation["mask"].shape == (4,)


def process_batches(
    monkeypatch: pytest.MonkeyPatch, processes: int, start_step: int, count: int
) -> list[list[dict[str, np.ndarray]]]:
    """``count`` training batches of every process of ``processes`` (global batch 2 *
    BATCH, seed 3, from ``start_step``), read as that process would."""
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    streams = []
    for index in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        batches = pipeline.train_batches(
            "cifar100", global_batch_size=2 * BATCH, seed=3, start_step=start_step
        )
        streams.append(take(batches, count))
    return streams


def test_process_batches_are_the_parts_of_the_one_process_global_batch(
    mocked: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 examples, 2 steps per epoch at global batch 8: from step 3, two epoch ends; the
    # one-process batches are distinct examples (test_every_epoch_is_a_permutation...),
    # so the parts are disjoint and cover the global batch
    (whole,) = process_batches(monkeypatch, 1, 3, 4)
    first, second = process_batches(monkeypatch, 2, 3, 4)
    for one, part0, part1 in zip(whole, first, second, strict=True):
        assert part0["label"].shape == part1["label"].shape == (BATCH,)
        for key in one:
            np.testing.assert_array_equal(np.concatenate([part0[key], part1[key]]), one[key])


# --------------------------------------------------------------------------------------
# Missing data.


PUBLIC_READERS: dict[str, Callable[[Path], object]] = {
    "train": lambda d: pipeline.train_batches("cifar10", global_batch_size=8, seed=0, data_dir=d),
    "eval": lambda d: pipeline.eval_batches("cifar10", global_batch_size=8, data_dir=d),
    "calibration": lambda d: pipeline.calibration_batches(
        "cifar10", global_batch_size=8, num_batches=1, seed=0, data_dir=d
    ),
    "steps_per_epoch": lambda d: pipeline.steps_per_epoch("cifar10", 8, data_dir=d),
}


@pytest.mark.parametrize("reader", sorted(PUBLIC_READERS))
def test_missing_data_fails_at_once_with_one_clear_error(reader: str, tmp_path: Path) -> None:
    with pytest.raises(pipeline.DatasetUnavailableError) as info:
        PUBLIC_READERS[reader](tmp_path)
    message = str(info.value)
    assert "'cifar10'" in message
    assert str(tmp_path) in message
    assert "download_and_prepare()" in message and "TFDS_DATA_DIR" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_data_dir_falls_back_to_tfds_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(pipeline.DatasetUnavailableError, match=str(tmp_path)):
        pipeline.eval_batches("cifar100", global_batch_size=8)


def test_failed_download_is_reported_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(self: tfds.core.DatasetBuilder, *args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(pipeline.DatasetUnavailableError, match="network is unreachable") as info:
        pipeline.train_batches(
            "cifar100", global_batch_size=8, seed=0, data_dir=tmp_path, download=True
        )
    assert "'cifar100'" in str(info.value) and info.value.__cause__ is None


def test_imagenet_message_explains_the_manual_download(tmp_path: Path) -> None:
    with pytest.raises(pipeline.DatasetUnavailableError, match=r"downloads/manual"):
        pipeline.steps_per_epoch("imagenet2012", 8, data_dir=tmp_path)


# --------------------------------------------------------------------------------------
# Batches on mocked data.


@pytest.mark.parametrize("name", ["cifar100", "imagenet2012"])
def test_train_batches_shapes_dtypes_and_values(mocked: None, name: str) -> None:
    spec = pipeline.dataset_spec(name)
    assert pipeline.steps_per_epoch(name, BATCH) == NUM_MOCK_EXAMPLES // BATCH
    batch = next(pipeline.train_batches(name, global_batch_size=BATCH, seed=0))
    assert batch.keys() == {"image", "label"}
    assert batch["image"].shape == (BATCH, spec.image_size, spec.image_size, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
    assert ((batch["label"] >= 0) & (batch["label"] < spec.num_classes)).all()
    pixels = unnormalise(batch["image"], name)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


def test_cifar_train_images_are_flipped_padded_crops(mocked: None) -> None:
    originals, labels = stored_examples("cifar100")
    for batch in take(pipeline.train_batches("cifar100", global_batch_size=BATCH, seed=3), 2):
        for image, label in zip(
            unnormalise(batch["image"], "cifar100"), batch["label"], strict=True
        ):
            index = padded_crop_index(np.round(image).astype(np.uint8), originals)
            assert index is not None and labels[index] == label


def test_every_epoch_is_a_permutation_of_the_split(mocked: None) -> None:
    steps = NUM_MOCK_EXAMPLES // BATCH
    batches = take(pipeline.train_batches("cifar100", global_batch_size=BATCH, seed=0), 2 * steps)
    epochs = [
        np.concatenate([b["label"] for b in batches[e * steps : (e + 1) * steps]]) for e in (0, 1)
    ]
    _, labels = stored_examples("cifar100")
    for epoch_labels in epochs:
        np.testing.assert_array_equal(np.sort(epoch_labels), np.sort(labels))
    assert not np.array_equal(epochs[0], epochs[1])


def test_eval_batches_pad_and_mask_so_each_example_counts_once(mocked: None) -> None:
    batches = list(pipeline.eval_batches("cifar100", global_batch_size=8))
    assert len(batches) == math.ceil(NUM_MOCK_EXAMPLES / 8)
    for batch in batches:
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    assert set(np.unique(mask)) == {0.0, 1.0} and mask.sum() == NUM_MOCK_EXAMPLES
    np.testing.assert_array_equal(mask[:NUM_MOCK_EXAMPLES], 1.0)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(images[NUM_MOCK_EXAMPLES:], 0.0)
    originals, original_labels = stored_examples("cifar100")
    np.testing.assert_allclose(
        unnormalise(images[:NUM_MOCK_EXAMPLES], "cifar100"), originals, atol=1e-3
    )
    np.testing.assert_array_equal(labels[:NUM_MOCK_EXAMPLES], original_labels)


def test_imagenet_eval_batches(mocked: None) -> None:
    batches = list(pipeline.eval_batches("imagenet2012", global_batch_size=8, split="validation"))
    assert [b["image"].shape for b in batches] == [(8, 224, 224, 3)] * 3
    assert sum(b["mask"].sum() for b in batches) == NUM_MOCK_EXAMPLES
    pixels = unnormalise(
        np.concatenate([b["image"] for b in batches])[:NUM_MOCK_EXAMPLES], "imagenet2012"
    )
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


# --------------------------------------------------------------------------------------
# Determinism and resumption.


def test_train_stream_depends_only_on_the_seed(mocked: None) -> None:
    def run(seed: int) -> list[dict[str, np.ndarray]]:
        return take(pipeline.train_batches("cifar100", global_batch_size=BATCH, seed=seed), 6)

    first = run(0)
    assert_same_batches(first, run(0))
    other = run(1)
    assert not all(
        np.array_equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True)
    )


@pytest.mark.parametrize(
    ("name", "shuffle_buffer"),
    [("cifar100", None), ("imagenet2012", 8)],  # 8 < 20 examples: files are re-read each epoch
)
@pytest.mark.parametrize("start_step", [3, 5, 7])
def test_resumed_stream_equals_uninterrupted_stream(
    mocked: None,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    shuffle_buffer: int | None,
    start_step: int,
) -> None:
    if shuffle_buffer is not None:
        spec = dataclasses.replace(pipeline.dataset_spec(name), shuffle_buffer=shuffle_buffer)
        monkeypatch.setitem(datasets.SPECS, name, spec)
    end_step = 12  # crosses the epoch boundaries at steps 5 and 10
    full = take(pipeline.train_batches(name, global_batch_size=BATCH, seed=7), end_step)
    resumed = pipeline.train_batches(name, global_batch_size=BATCH, seed=7, start_step=start_step)
    assert_same_batches(take(resumed, end_step - start_step), full[start_step:])


@pytest.mark.parametrize("augment", [True, False])
def test_calibration_batches_are_fixed_distinct_training_examples(
    mocked: None, augment: bool
) -> None:
    def calibration(seed: int) -> list[dict[str, np.ndarray]]:
        return pipeline.calibration_batches(
            "cifar100", global_batch_size=BATCH, num_batches=3, seed=seed, augment=augment
        )

    batches = calibration(5)
    assert len(batches) == 3 and batches[0].keys() == {"image", "label"}
    assert_same_batches(batches, calibration(5))
    assert not all(
        np.array_equal(a["label"], b["label"]) for a, b in zip(batches, calibration(6), strict=True)
    )
    originals, labels = stored_examples("cifar100")
    images = np.round(unnormalise(np.concatenate([b["image"] for b in batches]), "cifar100"))
    if augment:  # training transform: zero-padded crops, possibly flipped
        found = [padded_crop_index(image.astype(np.uint8), originals) for image in images]
    else:  # evaluation transform: the stored images themselves
        matches = [np.flatnonzero((originals == image).all(axis=(1, 2, 3))) for image in images]
        assert all(m.size == 1 for m in matches)
        found = [int(m[0]) for m in matches]
    assert None not in found
    assert len(set(found)) == len(images)  # distinct examples
    np.testing.assert_array_equal(labels[found], np.concatenate([b["label"] for b in batches]))
    with pytest.raises(ValueError, match="calibration batches"):
        pipeline.calibration_batches("cifar100", global_batch_size=BATCH, num_batches=6, seed=0)


# --------------------------------------------------------------------------------------
# Real CIFAR-10.


@needs_cifar10
def test_real_cifar10_batches_are_normalised() -> None:
    train = next(
        pipeline.train_batches("cifar10", global_batch_size=256, seed=0, data_dir=SHARED_DATA_DIR)
    )
    evaluation = next(
        pipeline.eval_batches("cifar10", global_batch_size=256, data_dir=SHARED_DATA_DIR)
    )
    assert pipeline.steps_per_epoch("cifar10", 256, data_dir=SHARED_DATA_DIR) == 50_000 // 256
    assert pipeline.num_examples("cifar10", "test", data_dir=SHARED_DATA_DIR) == 10_000
    assert train["image"].shape == evaluation["image"].shape == (256, 32, 32, 3)
    assert evaluation["mask"].sum() == 256
    # The zero padding of the random crop (about 13 % of the pixels) is not data: leave it out.
    spec = pipeline.dataset_spec("cifar10")
    padding_value = -np.array(spec.mean, np.float32) / np.array(spec.std, np.float32)
    is_data = ~np.isclose(train["image"], padding_value).all(axis=-1)
    for pixels in (train["image"][is_data], evaluation["image"].reshape(-1, 3)):
        assert np.all(np.abs(pixels.mean(axis=0)) < 0.3), pixels.mean(axis=0)
        assert np.all(np.abs(pixels.std(axis=0) - 1) < 0.3), pixels.std(axis=0)


def test_first_per_class_keeps_the_first_examples_of_each_class_in_stored_order() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 0, 1])
    np.testing.assert_array_equal(pipeline.first_per_class(labels, 2, 3), [0, 1, 2, 3, 4, 6])
    with pytest.raises(ValueError, match="train_examples_per_class=4 exceeds the 3 examples"):
        pipeline.first_per_class(labels, 4, 3)
    with pytest.raises(ValueError, match="integer >= 1, got 0"):
        pipeline.first_per_class(labels, 0, 3)


SUBSET_SPLIT = "train[:200]"  # every class has >= 3 examples among the first 200


@needs_cifar10
def test_class_subset_without_augmentation_is_the_same_eval_preprocessed_images_for_every_seed():
    per_class = 3
    (stored,) = take(
        pipeline.eval_batches(
            "cifar10", global_batch_size=200, split=SUBSET_SPLIT, data_dir=SHARED_DATA_DIR
        ),
        1,
    )
    chosen = np.concatenate(
        [np.flatnonzero(stored["label"] == label)[:per_class] for label in range(10)]
    )
    expected = sorted((int(stored["label"][i]), stored["image"][i].tobytes()) for i in chosen)
    common = {
        "global_batch_size": 10 * per_class,
        "data_dir": SHARED_DATA_DIR,
        "train_split": SUBSET_SPLIT,
        "examples_per_class": per_class,
    }
    sizes = {k: v for k, v in common.items() if k != "global_batch_size"}
    assert pipeline.steps_per_epoch("cifar10", 10 * per_class, **sizes) == 1
    epochs = {
        seed: take(pipeline.train_batches("cifar10", seed=seed, augment=False, **common), 2)
        for seed in (0, 1)
    }
    for seed, batches in epochs.items():
        for batch in batches:  # each batch is one whole epoch
            assert np.bincount(batch["label"], minlength=10).tolist() == [per_class] * 10
            got = sorted(
                (int(label), image.tobytes())
                for label, image in zip(batch["label"], batch["image"], strict=True)
            )
            assert got == expected, seed
    assert not np.array_equal(epochs[0][0]["label"], epochs[1][0]["label"])  # seeded order
    (augmented,) = take(pipeline.train_batches("cifar10", seed=0, **common), 1)
    assert sorted(augmented["label"].tolist()) == sorted(epochs[0][0]["label"].tolist())
    augmented_images = {image.tobytes() for image in augmented["image"]}
    assert len(augmented_images & {image for _, image in expected}) < per_class * 10  # cropped
    with pytest.raises(ValueError, match="train_examples_per_class=30 exceeds"):
        pipeline.steps_per_epoch(
            "cifar10", 10, data_dir=SHARED_DATA_DIR, train_split=SUBSET_SPLIT, examples_per_class=30
        )
