"""Host-side input pipelines (tf.data + TensorFlow Datasets) for CIFAR-10/100 and ImageNet.

Every public iterator yields numpy dicts for *this process only*: with ``P`` processes each
batch holds ``global_batch_size // P`` examples, so that the per-process batches (disjoint)
concatenate to the global batch. A training split that fits in the shuffle buffer is read
whole by every process, each keeping its part of every global batch, so training batches
do not depend on ``P``; a larger one, and every evaluation split, is read by each process
in its own part.

Determinism and resumption: the training stream is a pure function of ``(seed, step)`` (and
of ``P``, for a training split larger than the shuffle buffer). Epoch ``e`` reads the split
in an order fixed by a seed derived from ``(seed, e)`` and augments example ``i`` of that
epoch with stateless random ops seeded from ``(seed, e, i)``. Images stay encoded until
after the shuffle and the resume ``skip``, so ``train_batches(start_step=s)`` starts cheaply
at epoch ``s // steps_per_epoch`` and yields exactly the batches ``s, s + 1, ...`` of an
uninterrupted run.

Data location: ``data_dir`` if given, else the ``TFDS_DATA_DIR`` environment variable, else
the tensorflow-datasets default. A data set that is not prepared there (and cannot be
downloaded) raises :class:`DatasetUnavailableError` before any pipeline is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sdpoint_jax.data.specs import DatasetSpec, dataset_spec
from sdpoint_jax.errors import DatasetUnavailableError


def _training_spec(name: str, train_split: str | None) -> DatasetSpec:
    """``name``'s spec, training on ``train_split`` when given (e.g. ``"train[:45000]"``,
    keeping ``"train[45000:]"`` held out)."""
    spec = dataset_spec(name)
    return spec if train_split is None else dataclasses.replace(spec, train_split=train_split)


def _hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow on the CPU so that it does not reserve accelerator memory."""
    # RuntimeError: TF devices were already initialised; visibility can no longer change.
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")


_hide_gpus_from_tensorflow()

Batch = dict[str, np.ndarray]
PathLike = str | os.PathLike[str]


_CIFAR_PAD = 4
_IMAGENET_RESIZE = 256
_IMAGENET_AREA_RANGE = (0.08, 1.0)
_IMAGENET_ASPECT_RANGE = (3 / 4, 4 / 3)

# Purpose tags mixed into derived seeds so that independent uses never share a stream.
_SHUFFLE_TAG = 0
_AUGMENT_TAG = 1
_CALIBRATION_TAG = 2

_PARALLEL_MAP = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True}
_SKIP_IMAGE_DECODING = {"image": tfds.decode.SkipDecoding()}


# --------------------------------------------------------------------------------------
# Locating and checking the prepared data.


def _resolve_data_dir(data_dir: PathLike | None) -> str | None:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else None (the tensorflow-datasets default)."""
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get("TFDS_DATA_DIR") or None


def _unavailable_message(name: str, root: str, version_dir: str, reason: str) -> str:
    """One self-contained explanation of why ``name`` cannot be read and how to fix it."""
    lines = [
        f"Dataset {name!r} is not available: {reason}.",
        f"Searched data directory: {root} (expected the prepared data in {version_dir}).",
        "Prepare it with:",
        f'  python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}', data_dir='{root}').download_and_prepare()\"",
        "or point to a prepared copy with data_dir=... or the TFDS_DATA_DIR environment variable.",
    ]
    if name == "imagenet2012":
        lines.append(
            "imagenet2012 cannot be downloaded automatically: first place the ILSVRC2012 "
            f"archives in {os.path.join(root, 'downloads', 'manual')} "
            "(see https://www.tensorflow.org/datasets/catalog/imagenet2012)."
        )
    return "\n".join(lines)


def _prepared_builder(
    spec: DatasetSpec, data_dir: PathLike | None, download: bool
) -> tfds.core.DatasetBuilder:
    """Returns a builder whose data is prepared, downloading it first if allowed.

    Raises:
      DatasetUnavailableError: not prepared and ``download`` is False or the download fails.
    """
    root = _resolve_data_dir(data_dir)
    try:
        builder = tfds.builder(spec.name, data_dir=root)
    except Exception as err:  # tfds raises many error types for unreadable directories
        shown = root or "the tensorflow-datasets default"
        raise DatasetUnavailableError(
            _unavailable_message(spec.name, shown, shown, f"cannot open it ({err})")
        ) from None
    if builder.is_prepared():
        return builder
    reason = "it is not prepared and download=False"
    if download:
        try:
            builder.download_and_prepare()
        except Exception as err:  # any download/preparation failure ends up in one message
            reason = f"it is not prepared and downloading it failed ({type(err).__name__}: {err})"
        else:
            if builder.is_prepared():
                return builder
            reason = "it is still not prepared after download_and_prepare()"
    raise DatasetUnavailableError(
        _unavailable_message(spec.name, str(builder.data_dir_root), builder.data_dir, reason)
    ) from None


def _read_encoded(
    builder: tfds.core.DatasetBuilder, split: tfds.typing.SplitArg, shuffle_seed: int | None
) -> tf.data.Dataset:
    """Examples of ``split`` with the image left encoded (scalar ``tf.string``).

    With ``shuffle_seed`` the order of the record files is shuffled with that seed;
    otherwise files are read in their stored order.
    """
    return builder.as_dataset(
        split=split,
        decoders=_SKIP_IMAGE_DECODING,
        shuffle_files=shuffle_seed is not None,
        # Each pipeline reads its data once: tfds's automatic caching would only cost memory.
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False),
    )


def _cardinality(ds: tf.data.Dataset) -> int:
    """Number of elements of a finite dataset whose size tfds knows."""
    size = int(ds.cardinality())
    if size < 0:
        raise RuntimeError(f"the number of examples of {ds} is unknown")
    return size


def _split_size(builder: tfds.core.DatasetBuilder, split: tfds.typing.SplitArg) -> int:
    """Number of examples of ``split`` (a split name, a slice such as ``"train[:10%]"``
    or a ``tfds.split_for_jax_process`` part): from the data set's metadata where it
    has split metadata (a prepared data set), else by opening the split (a builder
    without it, such as ``tfds.testing.mock_data``'s)."""
    if builder.info.splits:
        return builder.info.splits[split].num_examples
    return _cardinality(_read_encoded(builder, split, shuffle_seed=None))


def num_examples(name: str, split: str, data_dir: PathLike | None = None) -> int:
    """Number of examples in ``split`` of the prepared data set ``name`` (all processes)."""
    spec = dataset_spec(name)
    return _split_size(_prepared_builder(spec, data_dir, download=False), split)


# --------------------------------------------------------------------------------------
# Process layout, batch sizes and seeds.


def _host_batch_size(global_batch_size: int) -> int:
    """Examples per step read by this process; the global batch must split evenly."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the number of "
            f"processes {processes}"
        )
    return global_batch_size // processes


def _host_split(split: str, drop_remainder: bool) -> tfds.typing.SplitArg:
    """This process's contiguous part of ``split`` (see ``tfds.split_for_jax_process``)."""
    return tfds.split_for_jax_process(
        split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        drop_remainder=drop_remainder,
    )


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def _derive_seeds(*words: int, count: int) -> np.ndarray:
    """``count`` well-mixed uint32 seeds that are a pure function of ``words`` (all >= 0)."""
    return np.random.SeedSequence(words).generate_state(count)


def _steps_per_epoch(
    builder: tfds.core.DatasetBuilder,
    spec: DatasetSpec,
    global_batch: int,
    examples_per_class: int | None,
) -> int:
    if examples_per_class is None:
        examples = _split_size(builder, spec.train_split)
    else:
        examples = len(_class_subset_indices(builder, spec, examples_per_class))
    steps = examples // global_batch
    if steps == 0:
        raise ValueError(
            f"global_batch_size {global_batch} exceeds the {examples} training examples "
            f"of {spec.name!r} {spec.train_split!r}: not a single full training batch per epoch"
        )
    return steps


def steps_per_epoch(
    name: str,
    global_batch_size: int,
    data_dir: PathLike | None = None,
    train_split: str | None = None,
    examples_per_class: int | None = None,
) -> int:
    """Full training steps per epoch: ``num_train_examples // global_batch_size``
    (``train_split``: the training split, default the data set's; ``examples_per_class``:
    its class-balanced subset, see :func:`train_batches`)."""
    spec = _training_spec(name, train_split)
    _host_batch_size(global_batch_size)
    builder = _prepared_builder(spec, data_dir, download=False)
    return _steps_per_epoch(builder, spec, global_batch_size, examples_per_class)


def _split_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    """Labels ``(N,)`` of ``split`` in its stored order (the images are not decoded)."""
    labels = _read_encoded(builder, split, shuffle_seed=None).map(
        _label, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return np.concatenate(list(tfds.as_numpy(labels.batch(65_536))))


@functools.cache
def _cached_subset_indices(
    data_dir: str, name: str, split: str, num_classes: int, per_class: int
) -> np.ndarray:
    builder = tfds.builder(name, data_dir=data_dir)
    return first_per_class(_split_labels(builder, split), per_class, num_classes)


def _class_subset_indices(
    builder: tfds.core.DatasetBuilder, spec: DatasetSpec, per_class: int
) -> np.ndarray:
    """Stored-order indices of the class-balanced subset of ``spec.train_split``
    (:func:`first_per_class`; read once per process and split)."""
    return _cached_subset_indices(
        str(builder.data_dir_root), spec.name, spec.train_split, spec.num_classes, per_class
    )


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Sorted indices of the first ``per_class`` examples of each of ``num_classes``
    classes in ``labels`` ``(N,)`` (stored order), ``per_class * num_classes`` in all.

    Raises:
      ValueError: ``per_class < 1``, or a class with fewer than ``per_class`` examples.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"train_examples_per_class must be an integer >= 1, got {per_class!r}")
    chosen = []
    for label in range(num_classes):
        where = np.flatnonzero(labels == label)[:per_class]
        if len(where) < per_class:
            raise ValueError(
                f"train_examples_per_class={per_class} exceeds the {len(where)} examples "
                f"of class {label} in the training split (at most "
                f"{min(np.bincount(labels, minlength=num_classes))})"
            )
        chosen.append(where)
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------------------
# Image transforms. Inputs are encoded images (scalar tf.string); outputs are float32
# HWC tensors in 0-255 units, normalised separately by `_normalise`.


def _decode_png(encoded: tf.Tensor) -> tf.Tensor:
    """PNG string (the CIFAR storage format) to uint8 ``[H, W, 3]``."""
    return tf.io.decode_png(encoded, channels=3)


def _decode_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG string (the ImageNet storage format) to uint8 ``[H, W, 3]``, accurate IDCT."""
    return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")


def _cifar_train_image(encoded: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """Zero-pads by 4 pixels, takes a random ``size x size`` crop and randomly flips it."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    padding = [[_CIFAR_PAD, _CIFAR_PAD], [_CIFAR_PAD, _CIFAR_PAD], [0, 0]]
    image = tf.pad(_decode_png(encoded), padding)
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.cast(image, tf.float32)


def _cifar_eval_image(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """The stored ``size x size`` image, unchanged."""
    return tf.cast(tf.ensure_shape(_decode_png(encoded), [size, size, 3]), tf.float32)


def _imagenet_train_image(encoded: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """Inception-style crop (area 8-100 %, aspect 3/4-4/3) resized to ``size``, random flip.

    If no valid crop is found in 10 attempts the whole image is used.
    """
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=box_seed,
        min_object_covered=0.0,
        aspect_ratio_range=_IMAGENET_ASPECT_RANGE,
        area_range=_IMAGENET_AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.concat([begin[:2], crop_size[:2]], axis=0)
    image = tf.image.decode_and_crop_jpeg(
        encoded, window, channels=3, dct_method="INTEGER_ACCURATE"
    )
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _imagenet_eval_image(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes the shorter side to 256 pixels and takes the central ``size x size`` crop."""
    image = _decode_jpeg(encoded)
    height_width = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = _IMAGENET_RESIZE / tf.reduce_min(height_width)
    new_size = tf.cast(tf.round(height_width * scale), tf.int32)
    image = tf.image.resize(image, new_size, method="bilinear", antialias=True)
    top, left = tf.unstack((new_size - size) // 2)
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


TrainTransform = Callable[[tf.Tensor, tf.Tensor, int], tf.Tensor]
EvalTransform = Callable[[tf.Tensor, int], tf.Tensor]

_TRANSFORMS: dict[str, tuple[TrainTransform, EvalTransform]] = {
    "cifar10": (_cifar_train_image, _cifar_eval_image),
    "cifar100": (_cifar_train_image, _cifar_eval_image),
    "imagenet2012": (_imagenet_train_image, _imagenet_eval_image),
}


def _normalise(image: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
    """``(image - mean) / std`` per channel; float32 ``[H, W, 3]`` in 0-255 units in."""
    return (image - tf.constant(spec.mean)) / tf.constant(spec.std)


def _label(example: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.cast(example["label"], tf.int32)


# --------------------------------------------------------------------------------------
# Pipelines.


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class _TrainSource:
    """Where the training examples of this process come from.

    Attributes:
      read: ``read(file_seed)``, the encoded examples (scalar ``tf.string`` images).
      readers: processes reading the same stream: ``jax.process_count()`` when ``read``
        gives the whole split (each process keeps its part of every global batch), 1
        when it gives this process's own part of the split.
      part: this process's index among the readers.
    """

    read: Callable[[int], tf.data.Dataset]
    readers: int
    part: int


def _train_source(
    builder: tfds.core.DatasetBuilder, spec: DatasetSpec, examples_per_class: int | None
) -> _TrainSource:
    """The training examples of this process (with ``examples_per_class``: only the
    class-balanced subset of the split, :func:`first_per_class`, which must then fit in
    the shuffle buffer).

    If the whole split fits in the shuffle buffer, every process reads all of it once,
    keeps it in memory and reuses it in every epoch; all processes then shuffle it alike
    and each keeps its contiguous part of every global batch, so the global batches (and
    their augmentation) do not depend on the number of processes: a run resumed with
    another process layout continues exactly. Otherwise each process reads its own part
    of the split (``tfds.split_for_jax_process``), its record files in an order shuffled
    with ``file_seed``, and the global batches depend on the layout.
    """
    size = _split_size(builder, spec.train_split)
    if examples_per_class is not None and size > spec.shuffle_buffer:
        raise ValueError(
            f"train_examples_per_class needs a training split that fits in the shuffle "
            f"buffer ({spec.shuffle_buffer} examples); {spec.train_split!r} has {size}"
        )
    if size <= spec.shuffle_buffer:
        records = _read_encoded(builder, spec.train_split, shuffle_seed=None)
        whole = records.batch(_cardinality(records)).get_single_element()
        if examples_per_class is not None:
            chosen = tf.constant(_class_subset_indices(builder, spec, examples_per_class))
            whole = {key: tf.gather(value, chosen) for key, value in whole.items()}
        in_memory = tf.data.Dataset.from_tensor_slices(whole)
        return _TrainSource(lambda _file_seed: in_memory, jax.process_count(), jax.process_index())
    split = _host_split(spec.train_split, drop_remainder=True)
    return _TrainSource(functools.partial(_read_encoded, builder, split), 1, 0)


def _train_epoch(
    source: _TrainSource,
    spec: DatasetSpec,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    num_batches: int,
    skip_batches: int,
    augment: bool,
) -> tf.data.Dataset:
    """Batches ``skip_batches .. num_batches - 1`` of this process in training epoch ``epoch``.

    Yields dicts with ``image`` float32 ``[batch_size, S, S, 3]`` (augmented, normalised) and
    ``label`` int32 ``[batch_size]``. The stream read by ``source.readers`` processes is
    shuffled in an order that depends on ``(seed, epoch)`` (and on the process, when
    each reads its own part), and its i-th example is augmented as a function of
    ``(seed, epoch, i)`` (without ``augment``: given the evaluation transform); batch
    ``k`` of this process is part ``source.part`` of the stream's ``k``-th run of
    ``batch_size * source.readers`` examples.
    """
    stream = jax.process_index() if source.readers == 1 else 0
    shuffle_seed = int(_derive_seeds(seed, _SHUFFLE_TAG, epoch, stream, count=1)[0])
    preprocess = (
        _train_preprocess(spec, _derive_seeds(seed, _AUGMENT_TAG, epoch, stream, count=2))
        if augment
        else _indexed(_eval_preprocess(spec))
    )
    stream_batch = batch_size * source.readers
    ds = source.read(shuffle_seed)
    ds = ds.shuffle(spec.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.take(num_batches * stream_batch).enumerate().skip(skip_batches * stream_batch)
    if source.readers > 1:
        ds = ds.filter(lambda index, _: index // batch_size % source.readers == source.part)
    ds = ds.map(preprocess, **_PARALLEL_MAP)
    return _finish(ds.batch(batch_size, drop_remainder=True))


def _train_preprocess(
    spec: DatasetSpec, augment_seed: np.ndarray
) -> Callable[[tf.Tensor, dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Maps ``(index, encoded example)`` to ``{"image": augmented, normalised float32
    [S, S, 3], "label": int32}``; the augmentation is a function of ``(augment_seed,
    index)`` only (stateless random ops)."""
    train_image, _ = _TRANSFORMS[spec.name]
    seed = tf.constant(augment_seed, tf.int64)

    def preprocess(index: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        example_seed = tf.random.experimental.stateless_fold_in(seed, index)
        image = train_image(example["image"], example_seed, spec.image_size)
        return {"image": _normalise(image, spec), "label": _label(example)}

    return preprocess


def _indexed(
    preprocess: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]],
) -> Callable[[tf.Tensor, dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """``preprocess`` of ``(index, example)`` pairs (the index unused)."""
    return lambda _index, example: preprocess(example)


def _iterate_train(
    source: _TrainSource,
    spec: DatasetSpec,
    *,
    seed: int,
    start_step: int,
    batch_size: int,
    epoch_steps: int,
    augment: bool,
) -> Iterator[Batch]:
    """Endless training batches from global step ``start_step`` on, epoch after epoch."""
    start_epoch, skip = divmod(start_step, epoch_steps)
    for epoch in itertools.count(start_epoch):
        ds = _train_epoch(
            source,
            spec,
            seed=seed,
            epoch=epoch,
            batch_size=batch_size,
            num_batches=epoch_steps,
            skip_batches=skip if epoch == start_epoch else 0,
            augment=augment,
        )
        yield from tfds.as_numpy(ds)


def train_batches(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    data_dir: PathLike | None = None,
    download: bool = False,
    train_split: str | None = None,
    examples_per_class: int | None = None,
    augment: bool = True,
) -> Iterator[Batch]:
    """Endless, deterministic stream of augmented training batches for this process
    (from ``train_split``, default the data set's training split).

    ``examples_per_class``: train on a fixed class-balanced subset of the split, the
    first that many examples of each class in the split's stored order
    (:func:`first_per_class`): the same for every seed and process. ``augment=False``
    gives training images the evaluation transform (no random crop or flip) instead.

    Yields ``{"image": float32 [B, S, S, 3], "label": int32 [B]}`` with
    ``B = global_batch_size // jax.process_count()``. The k-th yielded batch is global step
    ``start_step + k``; it depends only on ``(seed, start_step + k)``, so a run resumed at
    ``start_step`` sees exactly the batches an uninterrupted run sees from there on. Each
    epoch has :func:`steps_per_epoch` steps (the incomplete last batch is dropped).

    Raises (before anything is read):
      ValueError: unknown ``name``, bad ``seed``/``start_step``/``examples_per_class``
        (or a class with fewer examples), or a global batch size that does not split
        over the processes or exceeds the training examples.
      DatasetUnavailableError: the data set is not prepared and cannot be downloaded.
    """
    spec = _training_spec(name, train_split)
    batch_size = _host_batch_size(global_batch_size)
    _check_seed(seed)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    builder = _prepared_builder(spec, data_dir, download)
    return _iterate_train(
        _train_source(builder, spec, examples_per_class),
        spec,
        seed=seed,
        start_step=start_step,
        batch_size=batch_size,
        epoch_steps=_steps_per_epoch(builder, spec, global_batch_size, examples_per_class),
        augment=augment,
    )


def _eval_preprocess(spec: DatasetSpec) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Maps an encoded example to ``{"image": normalised float32 [S, S, 3], "label": int32}``."""
    _, eval_image = _TRANSFORMS[spec.name]

    def preprocess(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = eval_image(example["image"], spec.image_size)
        return {"image": _normalise(image, spec), "label": _label(example)}

    return preprocess


def _add_mask(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Marks a real (not padding) evaluation example: ``mask = 1.0``."""
    return {**example, "mask": tf.constant(1.0)}


def _padding_example(spec: DatasetSpec) -> dict[str, tf.Tensor]:
    """Zero image, label 0, ``mask = 0.0``: fills the last evaluation batches."""
    size = spec.image_size
    return {
        "image": tf.zeros([size, size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0),
    }


def eval_batches(
    name: str,
    *,
    global_batch_size: int,
    split: str | None = None,
    data_dir: PathLike | None = None,
    download: bool = False,
) -> Iterator[Batch]:
    """One ordered pass over ``split`` (default: the spec's ``eval_split``) for this process.

    Yields ``{"image": float32 [B, S, S, 3], "label": int32 [B], "mask": float32 [B]}`` with
    ``B = global_batch_size // jax.process_count()``. Every batch is full: padding examples
    (zero image, label 0) have ``mask == 0``, real ones ``mask == 1``, so summing over
    ``mask`` counts every example of the split exactly once across all processes. All
    processes yield the same number of batches, ``ceil(num_examples / global_batch_size)``.

    Raises (before anything is read): ValueError for bad arguments, DatasetUnavailableError
    if the data set is not prepared and cannot be downloaded.
    """
    spec = dataset_spec(name)
    batch_size = _host_batch_size(global_batch_size)
    builder = _prepared_builder(spec, data_dir, download)
    split = split or spec.eval_split
    num_batches = math.ceil(_split_size(builder, split) / global_batch_size)

    ds = _read_encoded(builder, _host_split(split, drop_remainder=False), shuffle_seed=None)
    num_padding = num_batches * batch_size - _cardinality(ds)
    ds = ds.map(_eval_preprocess(spec), **_PARALLEL_MAP)
    padding = tf.data.Dataset.from_tensors(_padding_example(spec)).repeat(num_padding)
    ds = ds.map(_add_mask).concatenate(padding)
    return iter(tfds.as_numpy(_finish(ds.batch(batch_size, drop_remainder=True))))


def calibration_batches(
    name: str,
    *,
    global_batch_size: int,
    num_batches: int,
    seed: int,
    data_dir: PathLike | None = None,
    download: bool = False,
    augment: bool = True,
    train_split: str | None = None,
) -> list[Batch]:
    """A fixed, seeded sample of training batches, for recomputing batch-norm statistics
    (from ``train_split``, default the data set's training split).

    ``num_batches`` dicts ``{"image": float32 [B, S, S, 3], "label": int32 [B]}`` (``B``
    as in :func:`train_batches`) of distinct training examples; the same ``seed`` always
    gives identical arrays. With ``augment`` (default) the examples get the *training*
    transform with fixed seeds: the statistics then describe the distribution the network
    was trained on, as the authors' calibration over the augmented training set does
    (on CIFAR, zero padding alone moves the input mean by about 0.3 std). Without it they
    get the evaluation transform.

    Raises: ValueError for bad arguments or more examples than this process's part of the
    training split, DatasetUnavailableError if the data set cannot be read.
    """
    spec = _training_spec(name, train_split)
    batch_size = _host_batch_size(global_batch_size)
    _check_seed(seed)
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    builder = _prepared_builder(spec, data_dir, download)
    shuffle_seed = int(_derive_seeds(seed, _CALIBRATION_TAG, jax.process_index(), count=1)[0])
    ds = _read_encoded(builder, _host_split(spec.train_split, drop_remainder=True), shuffle_seed)
    wanted = num_batches * batch_size
    if wanted > _cardinality(ds):
        raise ValueError(
            f"{num_batches} calibration batches of {batch_size} examples need {wanted} "
            f"examples, but this process's part of {spec.name!r} {spec.train_split!r} "
            f"has {_cardinality(ds)}"
        )
    ds = ds.shuffle(spec.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.take(wanted)
    if augment:
        seeds = _derive_seeds(seed, _CALIBRATION_TAG, _AUGMENT_TAG, jax.process_index(), count=2)
        ds = ds.enumerate().map(_train_preprocess(spec, seeds), **_PARALLEL_MAP)
    else:
        ds = ds.map(_eval_preprocess(spec), **_PARALLEL_MAP)
    return list(tfds.as_numpy(_finish(ds.batch(batch_size, drop_remainder=True))))
