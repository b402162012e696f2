"""Cost-dependent difficulty (Kuen et al., 2018, Sect. 6.2.3 and Fig. 5): test images
grouped by the minimum inference cost at which an SDPoint model classifies them
correctly.

Every instance of the model is evaluated on the test images; an image's group is the
cheapest instance (in FLOPs, :func:`sdpoint_jax.models.cost.count_flops`) under which it is a
top-``k`` hit, or "none correct". Instances of equal cost are ranked in the model's
instance order (the full network first). The paper shows ImageNet images grouped by
top-5 correctness and only those the full network gets right; here ``k`` is a
parameter (default 1, as top-5 on 10 classes says little) and every image is grouped,
with whether the full network is correct kept in the table (``full_correct``), so the
paper's subset is the rows where it is true.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from sdpoint_jax.analysis import Batch, Row, analysis_batches, check_one_process
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data.specs import dataset_spec
from sdpoint_jax.evaluation.evaluate import write_csv
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import restore_for_evaluation

NONE_CORRECT = -1
"""Group of the images that no instance classifies correctly."""

DIFFICULTY_CSV = "difficulty.csv"
DIFFICULTY_PNG = "difficulty_groups.png"


def cheapest_correct(correct: np.ndarray, gflops: np.ndarray) -> np.ndarray:
    """Index of the cheapest instance that classifies each image correctly.

    Args:
      correct: bool ``(I, N)``, whether instance ``i`` classifies image ``n`` correctly.
      gflops: ``(I,)`` cost of each instance; ties go to the lower index.

    Returns:
      int64 ``(N,)``: the index ``i`` of lowest ``gflops[i]`` among the instances with
      ``correct[i, n]``, or :data:`NONE_CORRECT` (-1) where there is none.
    """
    correct = np.asarray(correct, bool)
    gflops = np.asarray(gflops, np.float64)
    if correct.ndim != 2 or gflops.shape != correct.shape[:1]:
        raise ValueError(
            f"correct must be (instances, images) and gflops (instances,), got "
            f"{correct.shape} and {gflops.shape}"
        )
    order = np.argsort(gflops, kind="stable")
    by_cost = correct[order]
    first = order[np.argmax(by_cost, axis=0)] if len(order) else np.zeros(0, np.int64)
    return np.where(by_cost.any(axis=0), first, NONE_CORRECT).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class DifficultyResult:
    """Per-image correctness of every instance, and the resulting groups.

    Attributes:
      instances: the ``I`` evaluated instances.
      gflops: ``(I,)`` GFLOPs per image of each instance.
      labels: int ``(N,)`` labels of the images, in split order.
      correct: bool ``(I, N)`` top-k correctness.
      examples: group (instance index or :data:`NONE_CORRECT`) -> up to a fixed number
        of ``(image index, normalised image (H, W, 3))``, the first of the group in
        split order.
    """

    instances: tuple[Instance, ...]
    gflops: np.ndarray
    labels: np.ndarray
    correct: np.ndarray
    examples: dict[int, list[tuple[int, np.ndarray]]]

    @property
    def cheapest(self) -> np.ndarray:
        """``(N,)`` group of each image (see :func:`cheapest_correct`)."""
        return cheapest_correct(self.correct, self.gflops)

    def groups(self) -> list[tuple[int, int]]:
        """``(group, number of images)`` of every instance, cheapest first (ties in
        instance order), then :data:`NONE_CORRECT`; groups may be empty."""
        counts = np.bincount(self.cheapest + 1, minlength=len(self.instances) + 1)
        order = np.argsort(self.gflops, kind="stable")
        return [(int(i), int(counts[i + 1])) for i in order] + [(NONE_CORRECT, int(counts[0]))]

    def group_name(self, group: int) -> str:
        """``"3:0.5"``, ``"full"`` or ``"none correct"``."""
        return "none correct" if group == NONE_CORRECT else str(self.instances[group])


def _correct_fn(model: SDPointModel, top_k: int) -> Callable[..., jax.Array]:
    """Jitted ``(variables, images, labels, instance) -> bool (B,)``: top-``k`` hits.

    As in :mod:`sdpoint_jax.evaluation.evaluate`, an image is a hit when its logits are finite and
    fewer than ``k`` of them exceed its label's logit. ``instance`` is static.
    """

    @functools.partial(jax.jit, static_argnames="instance")
    def correct(
        variables: dict, images: jax.Array, labels: jax.Array, instance: Instance
    ) -> jax.Array:
        logits = model.apply(variables, images, instance=instance, train=False)
        label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
        rank = jnp.sum(logits > label_logit, axis=1)
        return jnp.all(jnp.isfinite(logits), axis=1) & (rank < top_k)

    return correct


def evaluate_difficulty(
    model: SDPointModel,
    variables: dict,
    batches: Iterable[Batch],
    *,
    input_hw: tuple[int, int],
    instances: Sequence[Instance] | None = None,
    top_k: int = 1,
    examples_per_group: int = 8,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> DifficultyResult:
    """Top-``k`` correctness of every instance on every real example of ``batches``.

    Args:
      model: the trained model (each instance read with its bn mode's statistics).
      variables: ``{"params": ..., "batch_stats": ...}``.
      batches: evaluation batches (``image`` normalised ``(B, H, W, 3)``, ``label``,
        ``mask``); examples with ``mask == 0`` are left out.
      input_hw: image height and width, for the FLOPs count.
      instances: the instances to compare (default: every instance of the model).
      top_k: a top-``k`` hit counts as correct.
      examples_per_group: images kept per group for the figure.
      mesh: if given, batches are split over its ``"data"`` axis.
      progress: show a progress bar.
    """
    instances = tuple(model.space if instances is None else instances)
    for instance in instances:
        model.space.validate(instance)
    if not 1 <= top_k <= model.num_classes:
        raise ValueError(f"top_k must lie in [1, {model.num_classes}], got {top_k}")
    gflops = np.array([count_flops(model, instance, input_hw) / 1e9 for instance in instances])
    correct_fn = _correct_fn(model, top_k)
    placed = variables if mesh is None else parallel.replicate(variables, mesh)
    labels, correct = [], []
    examples: dict[int, list[tuple[int, np.ndarray]]] = {}
    seen = 0
    for batch in tqdm(batches, desc="instances", unit="batch", disable=not progress):
        fields = {"image": batch["image"], "label": batch["label"]}
        placed_batch = fields if mesh is None else parallel.shard_batch(fields, mesh)
        real = batch["mask"] > 0
        hits = np.stack(
            [
                np.asarray(
                    correct_fn(placed, placed_batch["image"], placed_batch["label"], instance)
                )
                for instance in instances
            ]
        )[:, real]
        real_images = batch["image"][real]
        for offset, group in enumerate(cheapest_correct(hits, gflops)):
            kept = examples.setdefault(int(group), [])
            if len(kept) < examples_per_group:
                kept.append((seen + offset, real_images[offset]))
        labels.append(batch["label"][real])
        correct.append(hits)
        seen += int(real.sum())
    if not seen:
        raise ValueError("the evaluation batches hold no real examples")
    return DifficultyResult(
        instances, gflops, np.concatenate(labels), np.concatenate(correct, axis=1), examples
    )


def difficulty_rows(result: DifficultyResult, label_names: Sequence[str]) -> list[Row]:
    """One ``difficulty.csv`` row per image: its ``index`` in the split, ``label`` and
    ``label_name``, its group (``instance``: ``"full"``, ``"P:R"`` or ``"none"``, with
    ``point``, ``ratio`` and ``gflops``, empty for ``"none"``) and ``full_correct``."""
    full = result.instances.index(Instance.full()) if Instance.full() in result.instances else None
    rows = []
    for index, (label, group) in enumerate(zip(result.labels, result.cheapest, strict=True)):
        instance = None if group == NONE_CORRECT else result.instances[group]
        rows.append(
            {
                "index": index,
                "label": int(label),
                "label_name": label_names[label],
                "instance": "none" if instance is None else str(instance),
                "point": None if instance is None else instance.point,
                "ratio": None if instance is None else instance.ratio,
                "gflops": None if instance is None else float(result.gflops[group]),
                "full_correct": None if full is None else bool(result.correct[full, index]),
            }
        )
    return rows


def plot_difficulty_groups(
    result: DifficultyResult,
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    label_names: Sequence[str],
    title: str | None = None,
) -> None:
    """Saves a PNG: the number of images of every group (bars, cheapest first), then
    one row of example images per non-empty group, each captioned with its label name.

    ``mean`` and ``std`` (per channel, 0-255 units) undo the normalisation for display.
    """
    groups = result.groups()
    shown = [group for group, count in groups if count]
    columns = max(1, max(len(result.examples.get(group, ())) for group in shown))
    figure = Figure(figsize=(2.0 + 1.3 * columns, 3.0 + 1.5 * len(shown)), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1 + len(shown), columns, height_ratios=[2.0] + [1.0] * len(shown))
    sizes = figure.add_subplot(grid[0, :])
    total = sum(count for _, count in groups)
    names = [result.group_name(group) for group, _ in groups]
    counts = [count for _, count in groups]
    sizes.bar(range(len(groups)), counts, color=["C0"] * (len(groups) - 1) + ["C3"])
    sizes.set_xticks(range(len(groups)), names, rotation=60, ha="right", fontsize=7)
    for position, count in enumerate(counts):
        sizes.annotate(str(count), (position, count), ha="center", va="bottom", fontsize=7)
    sizes.set_ylabel("images")
    sizes.set_title(f"{total} images by cheapest correct instance (cheapest first)")
    mean_arr, std_arr = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for row, group in enumerate(shown, start=1):
        count = dict(groups)[group]
        caption = result.group_name(group)
        if group != NONE_CORRECT:
            caption += f"\n{result.gflops[group]:.4g} GFLOPs"
        caption += f"\n{count} ({100 * count / total:.1f}%)"
        kept = result.examples.get(group, [])
        for column in range(columns):
            axes = figure.add_subplot(grid[row, column])
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(caption, fontsize=8)
            if column >= len(kept):
                axes.set_frame_on(False)
                continue
            index, image = kept[column]
            pixels = np.clip((image * std_arr + mean_arr) / 255.0, 0.0, 1.0)
            axes.imshow(pixels, interpolation="nearest")
            axes.set_xlabel(f"#{index} {label_names[result.labels[index]]}", fontsize=7)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)


def label_names(config: ml_collections.ConfigDict) -> list[str]:
    """Class names of ``config.data.dataset`` from its tensorflow-datasets metadata."""
    builder = tfds.builder(config.data.dataset, data_dir=config.data.data_dir)
    return list(builder.info.features["label"].names)


def difficulty_run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    out: str | Path,
    *,
    images: int | None = None,
    top_k: int = 1,
    examples_per_group: int = 8,
) -> DifficultyResult:
    """Groups the first ``images`` test images (default: all) by the cheapest instance
    of the run in ``workdir`` that gets them right; writes ``OUT/difficulty.csv`` (see
    :func:`difficulty_rows`) and ``OUT/difficulty_groups.png``."""
    check_one_process()
    run, state, source = restore_for_evaluation(config, workdir)
    size = run.image_size
    print(
        f"evaluating {len(run.model.space)} instances (top-{top_k}) at step "
        f"{source.step}, {source.describe()}"
    )
    result = evaluate_difficulty(
        run.model,
        state.variables,
        analysis_batches(run, images),
        input_hw=(size, size),
        top_k=top_k,
        examples_per_group=examples_per_group,
        mesh=run.mesh,
        progress=True,
    )
    names = label_names(config)
    out = Path(out)
    write_csv(difficulty_rows(result, names), out / DIFFICULTY_CSV)
    spec = dataset_spec(config.data.dataset)
    title = f"{config.model.name} on {config.data.dataset}" + (
        "" if config.sdpoint.enabled else " (no SDPoint)"
    )
    plot_difficulty_groups(
        result,
        out / DIFFICULTY_PNG,
        mean=spec.mean,
        std=spec.std,
        label_names=names,
        title=f"{title}: top-{top_k} correct",
    )
    print(f"{'group':>14} {'GFLOPs':>8} {'images':>7}")
    for group, count in result.groups():
        cost = "-" if group == NONE_CORRECT else f"{result.gflops[group]:.4f}"
        print(f"{result.group_name(group):>14} {cost:>8} {count:>7}")
    print(f"wrote {out / DIFFICULTY_CSV} and {out / DIFFICULTY_PNG}")
    return result
