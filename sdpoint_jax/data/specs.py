"""The data sets sdpoint_jax knows: classes, input size, normalisation, splits.

Kept free of TensorFlow so that shape-only tools (FLOPs, benchmarks) start fast; the
input pipelines live in :mod:`sdpoint_jax.data`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static description of a supported data set.

    Attributes:
      name: tensorflow-datasets name.
      num_classes: number of labels; labels are ``int32`` in ``[0, num_classes)``.
      image_size: side of the square model input (``image_size x image_size x 3``).
      mean: per-channel (RGB) pixel mean in 0-255 units, subtracted from every image.
      std: per-channel (RGB) pixel standard deviation in 0-255 units, dividing every image.
      train_split: tfds split used for training (and batch-norm calibration).
      eval_split: default tfds split used for evaluation.
      shuffle_buffer: number of (encoded) examples in the training shuffle buffer.

    Split sizes are read from the prepared data at run time, see
    :func:`sdpoint_jax.data.num_examples`.
    """

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_split: str
    eval_split: str
    shuffle_buffer: int


SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        num_classes=10,
        image_size=32,
        mean=(125.307, 122.961, 113.866),
        std=(62.993, 62.089, 66.705),
        train_split="train",
        eval_split="test",
        shuffle_buffer=50_000,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        num_classes=100,
        image_size=32,
        mean=(129.304, 124.070, 112.434),
        std=(68.170, 65.392, 70.418),
        train_split="train",
        eval_split="test",
        shuffle_buffer=50_000,
    ),
    "imagenet2012": DatasetSpec(
        name="imagenet2012",
        num_classes=1000,
        image_size=224,
        mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375),
        train_split="train",
        eval_split="validation",
        shuffle_buffer=16_384,
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    """Returns the :class:`DatasetSpec` of ``name``; ValueError names unsupported ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; supported datasets: {', '.join(sorted(SPECS))}"
        ) from None
