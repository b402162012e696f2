"""Scale sensitivity (Kuen et al., 2018, Sect. 6.2.3): how much a model's class
probabilities change when the test images are shown at other scales.

The paper resizes ImageNet validation images to 7 *pre-crop* sizes, 256, 272, ..., 352
pixels (shorter side; 256 is the standard evaluation), takes the central 224 x 224
crop of each, and reports the mean over the 21 pairs of pre-crop sizes (and over the
images) of the cosine similarity of the 1000-class probability vectors: 0.944 for the
baseline, 0.961 with SDPoint (higher is less scale-sensitive).

Here the evaluation images (already the standard view: the 224 crop of the 256
pre-crop on ImageNet, the stored 32 x 32 image on CIFAR) are zoomed about their centre
by the factors ``size / 256`` for those 7 sizes (1, 1.0625, ..., 1.375) and centre-
cropped back to the input size: the crop of an image zoomed by ``f`` is the crop of the
image pre-cropped at ``256 f``, because the factors are >= 1 and the crop only reads the
central ``1 / f`` of the evaluated view. (On ImageNet the zoom interpolates the 256
pre-crop instead of the original photograph: a second bilinear resampling, not a
different view.) On CIFAR the same relative zooms stand in for the pre-crop sizes.

Zooming operates on *normalised* images: bilinear resizing is a per-channel weighted
average with weights summing to one, so it commutes with the per-channel affine
normalisation, and cropping does too; only padding would not, and the factors of the
paper never pad (see :func:`rescale_images` for factors < 1, which pad by replicating
the edge pixels, which commutes as well).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from sdpoint_jax.analysis import Batch, Row, analysis_batches, check_one_process
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.evaluation.evaluate import write_csv
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import restore_for_evaluation
from sdpoint_jax.xla_cpu.memory_maps import FirstCalls

PRECROP_SIZES = (256, 272, 288, 304, 320, 336, 352)
"""The paper's pre-crop sizes (shorter image side before the central crop)."""
STANDARD_PRECROP = 256
"""The pre-crop size of standard evaluation, the zoom factor 1."""
DEFAULT_FACTORS = tuple(size / STANDARD_PRECROP for size in PRECROP_SIZES)
"""Zoom factors of the evaluated view equivalent to :data:`PRECROP_SIZES`."""

SCALE_CSV = "scale_sensitivity.csv"
SCALE_PNG = "scale_sensitivity.png"


def _fit_axis(images: jax.Array, axis: int, size: int) -> jax.Array:
    """Centre-crops (or edge-pads) ``axis`` of ``images`` to ``size``; an odd surplus
    (or shortfall) goes to the end, as in the data pipeline's central crop."""
    current = images.shape[axis]
    if current >= size:
        start = (current - size) // 2
        return jax.lax.slice_in_dim(images, start, start + size, axis=axis)
    widths = [(0, 0)] * images.ndim
    before = (size - current) // 2
    widths[axis] = (before, size - current - before)
    return jnp.pad(images, widths, mode="edge")


def rescale_images(images: jax.Array, factor: float) -> jax.Array:
    """Zooms ``images`` about their centre by ``factor``, keeping their size.

    Args:
      images: float ``(B, H, W, C)``, raw or normalised (the result commutes with
        per-channel normalisation, see the module docstring).
      factor: zoom factor > 0. The images are resized (bilinear, antialiased when
        shrinking; ``jax.image.resize``) to ``round(factor * H) x round(factor * W)``,
        then centre-cropped to ``H x W`` (``factor >= 1``) or padded back to it by
        replicating their edge pixels (``factor < 1``). Factor 1 returns the images.

    Returns:
      ``(B, H, W, C)`` images of ``images``' float dtype; traceable (``jax.jit``) for a
      fixed ``factor``.
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"the zoom factor must be a positive number, got {factor}")
    batch, height, width, channels = images.shape
    size = (batch, round(factor * height), round(factor * width), channels)
    if min(size[1:3]) < 1:
        raise ValueError(f"zoom factor {factor} shrinks {height}x{width} images to nothing")
    resized = jax.image.resize(images, size, method="bilinear").astype(images.dtype)
    return _fit_axis(_fit_axis(resized, 1, height), 2, width)


def per_image_pairwise_cosine(probs: np.ndarray) -> np.ndarray:
    """Mean cosine similarity over the pairs of scales, per image.

    Args:
      probs: ``(S, N, C)`` class probabilities (or any non-zero vectors) of ``N`` images
        at ``S >= 2`` scales.

    Returns:
      float64 ``(N,)``: for each image the mean of ``cos(probs[s, n], probs[t, n])``
      over the ``S (S - 1) / 2`` pairs ``s < t``.
    """
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"probs must be (scales >= 2, images, classes), got {probs.shape}")
    norms = np.linalg.norm(probs, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("every probability vector must be finite and non-zero")
    unit = probs / norms
    gram = np.einsum("snc,tnc->nst", unit, unit)
    first, second = np.triu_indices(probs.shape[0], k=1)
    return gram[:, first, second].mean(axis=1)


def mean_pairwise_cosine(probs: np.ndarray) -> float:
    """The paper's scale-sensitivity score: the mean over images and pairs of scales of
    the cosine similarity of ``probs`` ``(S, N, C)`` (see
    :func:`per_image_pairwise_cosine`); 1 when no scale changes any prediction."""
    per_image = per_image_pairwise_cosine(probs)
    if per_image.size == 0:
        raise ValueError("probs holds no images")
    return float(per_image.mean())


@dataclasses.dataclass(frozen=True)
class ScaleResult:
    """One model's probabilities across scales, reduced per image.

    Attributes:
      factors: the ``S`` zoom factors.
      cosines: float64 ``(N,)``, each image's mean pairwise cosine similarity.
      correct: bool ``(S, N)``, top-1 correctness of each image at each factor.
    """

    factors: tuple[float, ...]
    cosines: np.ndarray
    correct: np.ndarray

    @property
    def mean_cosine(self) -> float:
        return float(self.cosines.mean())

    @property
    def accuracy(self) -> np.ndarray:
        """Top-1 accuracy (%) at each factor, ``(S,)``."""
        return 100.0 * self.correct.sum(axis=1) / self.correct.shape[1]


def _probabilities_fn(
    model: SDPointModel, factors: Sequence[float]
) -> Callable[[dict, jax.Array], jax.Array]:
    """Jitted ``(variables, images (B, H, W, 3)) -> float32 (S, B, classes)``: the full
    instance's softmax probabilities of the images zoomed by each factor."""

    @jax.jit
    def probabilities(variables: dict, images: jax.Array) -> jax.Array:
        def at(factor: float) -> jax.Array:
            zoomed = rescale_images(images, factor)
            logits = model.apply(variables, zoomed, instance=Instance.full(), train=False)
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        return jnp.stack([at(factor) for factor in factors])

    return probabilities


def scale_sensitivity(
    model: SDPointModel,
    variables: dict,
    batches: Iterable[Batch],
    *,
    factors: Sequence[float] = DEFAULT_FACTORS,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> ScaleResult:
    """Evaluates the full instance of ``model`` on ``batches`` at every zoom factor.

    Args:
      model: the trained model (its own bn mode's statistics are used).
      variables: ``{"params": ..., "batch_stats": ...}``.
      batches: evaluation batches (``image`` normalised ``(B, H, W, 3)``, ``label``,
        ``mask``); examples with ``mask == 0`` are left out.
      factors: ``S >= 2`` zoom factors (default: the paper's 7 pre-crop sizes).
      mesh: if given, batches are split over its ``"data"`` axis.
      progress: show a progress bar.
    """
    factors = tuple(float(factor) for factor in factors)
    if len(factors) < 2:
        raise ValueError(f"scale sensitivity needs at least 2 factors, got {factors}")
    probabilities = _probabilities_fn(model, factors)
    placed = variables if mesh is None else parallel.replicate(variables, mesh)
    first_calls = FirstCalls()  # each batch shape's first call compiles: in the map budget
    cosines, correct = [], []
    for batch in tqdm(batches, desc="scales", unit="batch", disable=not progress):
        images = batch["image"]
        if mesh is not None:
            images = parallel.shard_batch({"image": images}, mesh)["image"]
        real = batch["mask"] > 0
        with first_calls(images.shape):
            probs = np.asarray(probabilities(placed, images))[:, real]
        cosines.append(per_image_pairwise_cosine(probs))
        correct.append(probs.argmax(axis=-1) == batch["label"][real])
    if not cosines or not sum(len(part) for part in cosines):
        raise ValueError("the evaluation batches hold no real examples")
    return ScaleResult(factors, np.concatenate(cosines), np.concatenate(correct, axis=1))


def scale_row(
    label: str, config: ml_collections.ConfigDict, workdir: Path, step: int, result: ScaleResult
) -> Row:
    """The ``scale_sensitivity.csv`` row of one model: identity, factors (space-
    separated), mean cosine similarity, and top-1 accuracy (%) per factor."""
    return {
        "label": label,
        "workdir": str(workdir),
        "model": config.model.name,
        "dataset": config.data.dataset,
        "sdpoint": bool(config.sdpoint.enabled),
        "step": step,
        "images": int(result.cosines.size),
        "factors": " ".join(f"{factor:g}" for factor in result.factors),
        "mean_cosine": result.mean_cosine,
        **{
            f"top1_accuracy@{factor:g}": float(accuracy)
            for factor, accuracy in zip(result.factors, result.accuracy, strict=True)
        },
    }


def plot_scale_sensitivity(
    results: Sequence[tuple[str, ScaleResult]], path: str | Path, *, title: str | None = None
) -> None:
    """Saves a PNG with the mean pairwise cosine similarity of each model (bars) and
    its top-1 accuracy against the zoom factor (lines)."""
    if not results:
        raise ValueError("no results to plot")
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    bars, lines = figure.subplots(1, 2)
    labels = [label for label, _ in results]
    means = [result.mean_cosine for _, result in results]
    colours = [f"C{index % 10}" for index in range(len(results))]
    bars.bar(range(len(results)), means, color=colours)
    bars.set_xticks(range(len(results)), labels)
    for index, mean in enumerate(means):
        bars.annotate(f"{mean:.4f}", (index, mean), ha="center", va="bottom")
    low = min(means)
    bars.set_ylim(max(0.0, low - 0.1 * (1.0 - low) - 0.02), 1.0)
    bars.set_ylabel("mean pairwise cosine similarity")
    bars.set_title("scale sensitivity (higher: less sensitive)")
    for colour, (label, result) in zip(colours, results, strict=True):
        lines.plot(result.factors, result.accuracy, marker="o", color=colour, label=label)
    lines.set_xlabel(f"zoom factor (pre-crop size / {STANDARD_PRECROP})")
    lines.set_ylabel("top-1 accuracy (%)")
    lines.grid(True, alpha=0.3)
    lines.legend()
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)


@dataclasses.dataclass(frozen=True)
class ScaleModel:
    """One run to compare: its ``label`` in the table and plot, config and workdir."""

    label: str
    config: ml_collections.ConfigDict
    workdir: Path


def scale_run(
    models: Sequence[ScaleModel],
    out: str | Path,
    *,
    images: int | None = None,
    factors: Sequence[float] = DEFAULT_FACTORS,
) -> list[Row]:
    """Scale sensitivity of the full instance of every run in ``models`` on the first
    ``images`` test images (default: all); writes ``OUT/scale_sensitivity.csv`` (one
    row per model, see :func:`scale_row`) and ``OUT/scale_sensitivity.png``."""
    if not models:
        raise ValueError("give at least one run to analyse")
    labels = [model.label for model in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"the labels of the runs must be distinct, got {labels}")
    check_one_process()
    out = Path(out)
    rows, results = [], []
    for model in models:
        run, state, source = restore_for_evaluation(model.config, model.workdir)
        step = source.step
        print(
            f"{model.label}: full instance at {len(factors)} scales, step {step}, "
            f"{source.describe()}"
        )
        result = scale_sensitivity(
            run.model,
            state.variables,
            analysis_batches(run, images),
            factors=factors,
            mesh=run.mesh,
            progress=True,
        )
        rows.append(scale_row(model.label, model.config, run.workdir, step, result))
        results.append((model.label, result))
    write_csv(rows, out / SCALE_CSV)
    datasets = ", ".join(dict.fromkeys(model.config.data.dataset for model in models))
    plot_scale_sensitivity(results, out / SCALE_PNG, title=f"scale sensitivity on {datasets}")
    for row in rows:
        print(f"{row['label']:>20}: mean pairwise cosine {row['mean_cosine']:.4f}")
    print(f"wrote {out / SCALE_CSV} and {out / SCALE_PNG}")
    return rows
