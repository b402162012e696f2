"""A small synthetic ImageNet in ImageNet's own format, prepared for tensorflow-datasets.

    nice -n 19 python benchmarks/make_imagenet_sample.py --out /tmp/imagenet_sample

writes ``OUT/manual/ILSVRC2012_img_train.tar`` (one tar per class, ``nXXXXXXXX.tar``,
of ``nXXXXXXXX_I.JPEG`` files) and ``OUT/manual/ILSVRC2012_img_val.tar``
(``ILSVRC2012_val_%08d.JPEG``, labelled by tensorflow-datasets' own validation label
file), then prepares ``imagenet2012`` from them in ``OUT`` exactly as for the real
archives (``tfds.builder("imagenet2012", data_dir=OUT).download_and_prepare(...)``),
so ``--data-dir OUT`` (``--config.data.data_dir=OUT``) reads it like ImageNet.

The images are JPEG (quality 90, 4:2:0) at ImageNet's common sizes (500x375, 375x500,
500x333, 500x500, 640x480 ...; mean about 460x430 pixels), with smooth colour fields
and fine-grained texture, so decoding costs about what ImageNet's photographs cost
(their mean file is about 110 KB; these are 50-130 KB, mean about 100 KB). The labels
mean nothing: this data set measures the input pipeline, it trains nothing.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480), (400, 300))
"""(width, height) of the generated images, drawn uniformly."""


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """One JPEG photograph-like image at one of :data:`SIZES`."""
    width, height = SIZES[rng.integers(len(SIZES))]
    coarse = rng.uniform(0, 255, size=(1, 6, 8, 3)).astype(np.float32)
    image = tf.image.resize(coarse, (height, width), method="bicubic")[0]
    texture = rng.normal(0.0, 12.0, size=(height, width, 1)).astype(np.float32)
    image = tf.clip_by_value(image + texture, 0, 255)
    return tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90).numpy()


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_train_tar(path: Path, synsets: list[str], per_class: int, rng) -> None:
    with tarfile.open(path, "w") as outer:
        for synset in synsets:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for index in range(per_class):
                    add_file(inner, f"{synset}_{index}.JPEG", synthetic_jpeg(rng))
            add_file(outer, f"{synset}.tar", inner_bytes.getvalue())


def write_val_tar(path: Path, count: int, rng) -> None:
    with tarfile.open(path, "w") as archive:
        for index in range(1, count + 1):
            add_file(archive, f"ILSVRC2012_val_{index:08d}.JPEG", synthetic_jpeg(rng))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="tensorflow-datasets data dir")
    parser.add_argument("--classes", type=int, default=100, help="classes (at most 1000)")
    parser.add_argument("--per-class", type=int, default=30, help="training images per class")
    parser.add_argument("--val", type=int, default=300, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    synsets = imagenet_common.label_names_file()
    synsets = Path(synsets).read_text().split()[: args.classes]
    rng = np.random.default_rng(args.seed)
    manual = args.out / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    write_train_tar(manual / "ILSVRC2012_img_train.tar", synsets, args.per_class, rng)
    write_val_tar(manual / "ILSVRC2012_img_val.tar", args.val, rng)
    builder = tfds.builder("imagenet2012", data_dir=str(args.out))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} images, {info.num_bytes / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
