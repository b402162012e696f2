"""Confidence cascade across SDPoint instances: cheap instances classify the samples
they are sure of, costlier instances only the rest.

Stages. The cascade's stages are the instances on the Pareto front of (GFLOPs per
image, top-1 error on held-out training images), ordered by cost, so each stage costs
more and errs less than the one before (:func:`cascade_stages`). An instance off that
front is left out: a cheaper one at least as accurate on held-out images exists.

Inference (:class:`Cascade`). Stage 1 classifies the whole batch. A sample whose top
softmax probability reaches stage ``i``'s threshold stops there, with stage ``i``'s
prediction; the others go on to stage ``i + 1``, and the last stage takes every sample
left. This is the budgeted classification of :mod:`sdpoint_jax.evaluation.budget` with instances
as its stages.

Cost (:data:`ACCOUNTINGS`). Instance ``(p, r)`` computes its prefix up to point
``p`` exactly as the full network does (:mod:`sdpoint_jax.core.prefix`: same layers
and map sizes, and, by :func:`sdpoint_jax.core.norm.statistics_key`, the same
batch-norm statistics, in either bn mode). So a later stage starts from the map an
earlier stage left at its point (:func:`prefix_plan`: the deepest earlier point that
it shares) and runs only the layers after it. With ``"prefix"`` accounting (the
default, what :class:`Cascade` runs) a sample stopping at stage ``i`` costs stage 1
plus the increments of stages ``2..i`` (:func:`stage_costs`); with ``"summed"`` every
stage runs from the image and costs its whole instance, the sum of stages ``1..i``
(the accounting of earlier versions, kept for comparison). Either way the average cost
is that per-sample cost averaged over the samples.

Thresholds (:func:`cascade_rows`). For each target average cost,
:func:`sdpoint_jax.evaluation.budget.fit_thresholds` fits the thresholds on held-out training
images (MSDNet's and IMTA's procedure for exits); the cascade is then measured on the
test images and compared with the best single instance costing no more than the
cascade's measured average: whether the cascade beats that instance at equal cost.

:func:`evaluate_cascade` does it all for a trained model (``python -m sdpoint_jax.main
evaluate --cascade``, written to ``cascade.csv`` and ``cascade.json``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.prefix import prefix_depth, shares_prefix, tapped
from sdpoint_jax.evaluation.budget import budgeted_eval, budgeted_stops, fit_thresholds
from sdpoint_jax.evaluation.selection import pareto_front, select_instance
from sdpoint_jax.models import SDPointModel
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training import parallel
from sdpoint_jax.xla_cpu.compiler_options import inference_compiler_options
from sdpoint_jax.xla_cpu.memory_maps import FirstCalls

Batch = dict[str, np.ndarray]
Row = dict[str, Any]

ACCOUNTINGS = ("prefix", "summed")
"""How a stage's cost is counted: ``"prefix"`` (resumed from an earlier stage's prefix,
the layers after it only) or ``"summed"`` (the whole instance, from the image)."""


@functools.cache
def _probabilities_fn(model: SDPointModel) -> Callable[..., jax.Array]:
    """Jitted ``(variables, images (B, H, W, 3), instance) -> float32 (B, classes)``
    softmax probabilities in eval mode. ``instance`` is static: one program per instance
    (and per batch size), shared by every user of an equal ``model``."""

    @functools.partial(
        jax.jit, static_argnames="instance", compiler_options=inference_compiler_options()
    )
    def probabilities(variables: Any, images: jax.Array, instance: Instance) -> jax.Array:
        logits = model.apply(variables, images, instance=instance, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return probabilities


@functools.cache
def _staged_fn(model: SDPointModel) -> Callable[..., jax.Array]:
    """Jitted ``(variables, inputs, instance, start, capture, input_hw) -> (probs,
    map)``: softmax probabilities of ``instance`` in eval mode, run from ``inputs``:
    images ``(B, H, W, 3)`` where ``start == 0``, else the map at the tap of point
    ``start`` (:mod:`sdpoint_jax.core.prefix`; the layers before it are left out of the
    compiled program); ``map`` is the one at the tap of point ``capture`` (``None``
    where ``capture == 0``). All but the arrays are static."""

    @functools.partial(
        jax.jit,
        static_argnames=("instance", "start", "capture", "input_hw"),
        compiler_options=inference_compiler_options(),
    )
    def staged(
        variables: Any,
        inputs: jax.Array,
        instance: Instance,
        start: int,
        capture: int,
        input_hw: tuple[int, int],
    ) -> tuple[jax.Array, jax.Array | None]:
        images = jnp.zeros((len(inputs), *input_hw, 3), jnp.float32) if start else inputs
        resume = (start, inputs) if start else None
        with tapped(resume=resume, capture=capture or None) as captured:
            logits = model.apply(variables, images, instance=instance, train=False)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return probs, (captured[0] if capture else None)

    return staged


@dataclasses.dataclass(frozen=True)
class StageRun:
    """How :class:`Cascade` runs one stage: from the map at the tap of point ``start``
    (``0``: from the image), keeping the map at the tap of point ``capture`` for later
    stages (``0``: none)."""

    start: int
    capture: int


def prefix_plan(
    stages: Sequence[Instance], space: InstanceSpace, bn_mode: str, *, reuse: bool = True
) -> tuple[StageRun, ...]:
    """Where each stage starts and what it keeps: stage ``j`` starts at the deepest
    point ``d_i = prefix_depth(stage i)`` of an earlier stage ``i`` whose prefix of
    that depth it shares (:func:`sdpoint_jax.core.prefix.shares_prefix`), else from the
    image; the first stage of each such depth captures its map. ``reuse=False``: every
    stage from the image (the ``"summed"`` accounting)."""
    depths = [prefix_depth(stage, space) for stage in stages]
    starts = []
    for j, stage in enumerate(stages):
        shared = [
            depths[i]
            for i in range(j)
            if reuse and shares_prefix(stages[i], stage, depths[i], space, bn_mode)
        ]
        starts.append(max(shared, default=0))
    captures = [
        depths[i] if depths[i] in starts[i + 1 :] and depths[i] not in depths[:i] else 0
        for i in range(len(stages))
    ]
    return tuple(StageRun(start, capture) for start, capture in zip(starts, captures, strict=True))


def stage_costs(
    model: SDPointModel,
    stages: Sequence[Instance],
    input_hw: tuple[int, int],
    accounting: str = "prefix",
) -> np.ndarray:
    """GFLOPs ``(k,)`` stage ``i`` adds for a sample that reaches it: the counter's
    FLOPs (:func:`sdpoint_jax.models.cost.count_flops`) of the layers it runs under
    :func:`prefix_plan` (``"prefix"``), or of its whole instance (``"summed"``)."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    plan = prefix_plan(stages, model.space, model.bn_mode, reuse=accounting == "prefix")
    return np.array(
        [
            count_flops(model, stage, input_hw, start=run.start) / 1e9
            for stage, run in zip(stages, plan, strict=True)
        ]
    )


def instance_probabilities(
    model: SDPointModel,
    variables: Any,
    batches: Iterable[Batch],
    instances: Sequence[Instance],
    *,
    mesh: Mesh | None = None,
    progress: bool = False,
    desc: str = "probabilities",
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of every instance on every real example, in one pass.

    Args:
      model: the trained model (each instance read with its bn mode's statistics).
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model``.
      batches: evaluation batches, read once: ``"image"`` float32 ``(B, H, W, 3)``,
        ``"label"`` int ``(B,)`` and ``"mask"`` ``(B,)``; examples with ``mask == 0``
        (padding) are left out.
      instances: the ``k`` instances, each validated against the model.
      mesh: if given, batches are split over its ``"data"`` axis (one process only).
      progress: show a progress bar titled ``desc``.

    Returns:
      ``(probs, labels)``: float32 ``(k, N, classes)`` in ``instances`` order and int
      ``(N,)``, ``N`` the number of real examples in batch order.

    Raises:
      ValueError: no instances, an instance outside the model's space, more than one
        JAX process, or no real examples.
    """
    if not instances:
        raise ValueError("instance_probabilities needs at least one instance, got none")
    for instance in instances:
        model.space.validate(instance)
    if jax.process_count() > 1:
        raise ValueError(
            f"instance_probabilities runs in one process; there are {jax.process_count()}"
        )
    probabilities = _probabilities_fn(model)
    placed = variables if mesh is None else parallel.replicate(variables, mesh)
    first_calls = FirstCalls()  # each (instance, shape)'s first call compiles: in the budget
    probs, labels = [], []
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        images = batch["image"]
        if mesh is not None:
            images = parallel.shard_batch({"image": images}, mesh)["image"]
        real = np.asarray(batch["mask"]) > 0
        per_instance = []
        for instance in instances:
            with first_calls((instance, images.shape)):
                per_instance.append(np.asarray(probabilities(placed, images, instance))[real])
        probs.append(np.stack(per_instance))
        labels.append(np.asarray(batch["label"])[real])
    if not labels or not sum(len(part) for part in labels):
        raise ValueError("the batches hold no real examples (no batches, or every mask is 0)")
    return np.concatenate(probs, axis=1), np.concatenate(labels)


def top1_errors(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 error in percent ``(k,)`` of each of ``probs`` ``(k, N, classes)`` against
    ``labels`` ``(N,)`` (the prediction is the first class of highest probability)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 3 or labels.shape != probs.shape[1:2]:
        raise ValueError(
            f"need probs (k, N, classes) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    return 100.0 * np.mean(np.argmax(probs, axis=-1) != labels, axis=1)


def cascade_stages(gflops: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the cascade's stages among candidate instances, cheapest first: the
    Pareto front of ``(gflops, errors)`` (:func:`sdpoint_jax.evaluation.selection.pareto_front`), so
    every stage has higher cost and strictly lower error than the one before; of equal
    costs only the lowest error can be a stage (the first candidate on an exact tie).

    Args:
      gflops: ``(I,)`` cost of each candidate.
      errors: ``(I,)`` its top-1 error on held-out data.
    """
    if len(gflops) != len(errors) or not len(gflops):
        raise ValueError(
            f"need one error per candidate and at least one candidate, got {len(gflops)} "
            f"costs and {len(errors)} errors"
        )
    rows = [
        {"index": index, "gflops": float(cost), "top1_error": float(error)}
        for index, (cost, error) in enumerate(zip(gflops, errors, strict=True))
    ]
    return [row["index"] for row in pareto_front(rows)]


def cumulative_gflops(stage_gflops: Sequence[float]) -> np.ndarray:
    """Cost ``(k,)`` of a sample stopping at each stage: the sum of what stages
    ``1..i`` add (``stage_gflops``, :func:`stage_costs`), each of which ran on it (see
    the module docstring)."""
    costs = np.asarray(stage_gflops, dtype=np.float64)
    if costs.ndim != 1 or not len(costs) or not np.all(costs > 0):
        raise ValueError(f"stage_gflops must be one positive cost per stage, got {stage_gflops}")
    return np.cumsum(costs)


def budget_targets(
    stage_gflops: Sequence[float], full_gflops: float, budget_points: int
) -> np.ndarray:
    """The target average costs: ``budget_points`` evenly spaced strictly between stage
    1's GFLOPs and ``full_gflops`` (the full network's), keeping those a cascade of
    these stages can reach (at most the cost of running every stage).

    Raises:
      ValueError: ``budget_points < 1``, or no target reachable (e.g. one stage).
    """
    if budget_points < 1:
        raise ValueError(f"budget_points must be >= 1, got {budget_points}")
    reachable = cumulative_gflops(stage_gflops)
    targets = np.linspace(reachable[0], full_gflops, budget_points + 2)[1:-1]
    targets = targets[(targets > reachable[0]) & (targets <= reachable[-1])]
    if not len(targets):
        raise ValueError(
            f"no target average cost in ({reachable[0]:g}, {full_gflops:g}) GFLOPs is "
            f"reachable by {len(reachable)} stage(s), which cost {reachable[-1]:g} GFLOPs "
            f"at most; a cascade needs at least two stages"
        )
    return targets


def _floats(values: Iterable[float]) -> str:
    return ",".join(str(float(value)) for value in values)


def cascade_rows(
    fit_probs: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    stages: Sequence[Instance],
    stage_gflops: Sequence[float],
    *,
    full_gflops: float,
    budget_points: int,
    single_rows: Sequence[Row],
    bn_mode: str = "instance",
    accounting: str = "prefix",
) -> list[Row]:
    """One row per target average cost of :func:`budget_targets`: thresholds fit on the
    held-out probabilities, cascade measured on the test probabilities.

    Args:
      fit_probs: float ``(k, N_fit, classes)`` held-out probabilities of the stages.
      test_probs: float ``(k, N, classes)`` test probabilities of the stages.
      test_labels: int ``(N,)``.
      stages: the ``k`` stage instances, cheapest first.
      stage_gflops: ``(k,)`` GFLOPs each stage adds for a sample that reaches it
        (:func:`stage_costs`).
      full_gflops: the full network's GFLOPs per image (the highest target).
      budget_points: number of targets.
      single_rows: test results of single instances (``point``, ``ratio``, ``gflops``,
        ``top1_error``, ``bn_mode``, as :func:`sdpoint_jax.evaluation.evaluate.evaluate_instances`
        returns), to compare with.
      bn_mode: which of ``single_rows`` to compare with.
      accounting: how ``stage_gflops`` were counted (:data:`ACCOUNTINGS`), recorded.

    Returns:
      Rows with ``accounting``, ``target_gflops``; ``fit_avg_gflops`` (average cost on the held-out
      images); ``avg_gflops`` and ``top1_error`` (%) on the test images; ``stages``
      (``"P:R,..,full"``); ``thresholds`` of stages ``1..k-1`` (the last takes every
      sample left; ``inf`` lets none stop); ``stage_fractions``, the fraction of test
      samples stopping at each stage; ``single_instance``, ``single_gflops`` and
      ``single_top1_error`` of the most accurate single instance with ``gflops <=
      avg_gflops``; ``error_vs_single`` = ``top1_error - single_top1_error`` (negative:
      the cascade is more accurate at no more cost) and ``beats_single``;
      ``fit_examples`` and ``examples``.
    """
    fit_probs, test_probs = np.asarray(fit_probs), np.asarray(test_probs)
    k = len(stages)
    if (
        fit_probs.ndim != 3
        or test_probs.ndim != 3
        or len(fit_probs) != k
        or len(test_probs) != k
        or fit_probs.shape[2] != test_probs.shape[2]
    ):
        raise ValueError(
            f"need fit_probs (k, N_fit, classes) and test_probs (k, N, classes) of the "
            f"{k} stages, got {fit_probs.shape} and {test_probs.shape}"
        )
    costs = cumulative_gflops(stage_gflops)
    if len(costs) != k:
        raise ValueError(f"need one cost per stage ({k}), got {len(costs)}")
    names = ",".join(str(stage) for stage in stages)
    rows = []
    for target in budget_targets(stage_gflops, full_gflops, budget_points):
        thresholds = fit_thresholds(fit_probs, costs, float(target))
        fit_stops = budgeted_stops(fit_probs, thresholds)
        avg_gflops, error = budgeted_eval(test_probs, test_labels, thresholds, costs)
        stops = budgeted_stops(test_probs, thresholds)
        # the relative 1e-9 absorbs the rounding of a mean of equal costs
        budget = avg_gflops * (1.0 + 1e-9)
        single = select_instance(single_rows, budget_gflops=budget, bn_mode=bn_mode)
        rows.append(
            {
                "accounting": accounting,
                "target_gflops": float(target),
                "fit_avg_gflops": float(costs[fit_stops].mean()),
                "avg_gflops": avg_gflops,
                "top1_error": error,
                "stages": names,
                "thresholds": _floats(thresholds[:-1]),
                "stage_fractions": _floats(np.bincount(stops, minlength=k) / len(stops)),
                "single_instance": str(Instance(single["point"], single["ratio"])),
                "single_gflops": float(single["gflops"]),
                "single_top1_error": float(single["top1_error"]),
                "error_vs_single": error - float(single["top1_error"]),
                "beats_single": error < float(single["top1_error"]),
                "fit_examples": fit_probs.shape[1],
                "examples": test_probs.shape[1],
            }
        )
    return rows


def evaluate_cascade(
    model: SDPointModel,
    variables: Any,
    fit_batches: Iterable[Batch],
    test_batches: Iterable[Batch],
    instances: Sequence[Instance],
    *,
    input_hw: tuple[int, int],
    budget_points: int,
    single_rows: Sequence[Row],
    accounting: str = "prefix",
    mesh: Mesh | None = None,
    progress: bool = False,
) -> list[Row]:
    """Chooses the stages among ``instances`` on ``fit_batches`` (held-out training
    images), fits the thresholds there and measures the cascade on ``test_batches``.

    Args:
      model, variables: the trained model and its variables (its own bn mode).
      fit_batches, test_batches: batches as :func:`instance_probabilities` reads them.
      instances: the candidate stages.
      input_hw: image height and width, for the FLOPs count.
      budget_points: number of target average costs (:func:`budget_targets`).
      single_rows: test results of single instances to compare with (:func:`cascade_rows`).
      accounting: the stages' costs, :data:`ACCOUNTINGS` (:func:`stage_costs`).
      mesh: split batches over its ``"data"`` axis.
      progress: show progress bars.

    Returns:
      The rows of :func:`cascade_rows`.

    Raises:
      ValueError: fewer than two stages on the held-out Pareto front, and the errors of
        :func:`instance_probabilities` and :func:`cascade_rows`.
    """
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    candidates = list(dict.fromkeys(instances))
    fit_probs, fit_labels = instance_probabilities(
        model, variables, fit_batches, candidates, mesh=mesh, progress=progress, desc="held out"
    )
    gflops = np.array([count_flops(model, i, input_hw) / 1e9 for i in candidates])
    chosen = cascade_stages(gflops, top1_errors(fit_probs, fit_labels))
    stages = [candidates[index] for index in chosen]
    if len(stages) < 2:
        raise ValueError(
            f"the held-out Pareto front of the {len(candidates)} instances is only "
            f"{stages[0]}: a cascade needs at least two stages"
        )
    test_probs, test_labels = instance_probabilities(
        model, variables, test_batches, stages, mesh=mesh, progress=progress, desc="cascade"
    )
    return cascade_rows(
        fit_probs[chosen],
        test_probs,
        test_labels,
        stages,
        stage_costs(model, stages, input_hw, accounting),
        full_gflops=count_flops(model, Instance.full(), input_hw) / 1e9,
        budget_points=budget_points,
        single_rows=single_rows,
        bn_mode=model.bn_mode,
        accounting=accounting,
    )


def format_cascade(rows: Sequence[Row]) -> str:
    """A text table of :func:`cascade_rows`: costs, errors and the comparison."""
    lines = [
        f"{'target':>8} {'fit avg':>8} {'avg':>8} {'top-1 err':>9} "
        f"{'single':>7} {'GFLOPs':>8} {'top-1 err':>9} {'diff':>6}"
    ]
    for row in rows:
        lines.append(
            f"{row['target_gflops']:>8.4f} {row['fit_avg_gflops']:>8.4f} "
            f"{row['avg_gflops']:>8.4f} {row['top1_error']:>9.2f} "
            f"{row['single_instance']:>7} {row['single_gflops']:>8.4f} "
            f"{row['single_top1_error']:>9.2f} {row['error_vs_single']:>+6.2f}"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class CascadeOutput:
    """What :class:`Cascade` returns for a batch of ``B`` images.

    Attributes:
      probs: float32 ``(B, classes)`` softmax probabilities of the stage each sample
        stopped at.
      stage: int ``(B,)`` index ``0..k-1`` of that stage.
      evaluated: ``(k,)`` number of samples each stage classified (``B`` for stage 1,
        then those not stopped yet; 0 once every sample has stopped).
      batch_sizes: ``(k,)`` batch size each stage ran at, padding included (0 when it
        did not run).
    """

    probs: np.ndarray
    stage: np.ndarray
    evaluated: tuple[int, ...]
    batch_sizes: tuple[int, ...]

    @property
    def predictions(self) -> np.ndarray:
        """int ``(B,)`` predicted classes."""
        return np.argmax(self.probs, axis=-1)


def bucket_size(remaining: int, batch: int) -> int:
    """Batch size a later stage runs ``remaining`` samples at: the next power of two,
    at most ``batch``; so at most ``log2(batch) + 2`` programs per stage get compiled."""
    if not 1 <= remaining <= batch:
        raise ValueError(f"remaining must lie in [1, {batch}], got {remaining}")
    return min(1 << (remaining - 1).bit_length(), batch)


class Cascade:
    """A confidence cascade for inference: ``cascade(images) -> CascadeOutput``.

    Stage 1 runs on the whole batch; each later stage runs only on the samples whose
    top probability stayed below every earlier stage's threshold. With
    ``reuse_prefix`` (the default) a later stage starts from the map an earlier stage
    kept at its point, as :func:`prefix_plan` says, and runs only the layers after it;
    the outputs are those of running it from the image (up to float rounding: XLA may
    fuse the shortened program differently), at the cost :func:`stage_costs` counts.
    The samples left are gathered on the host and padded with zeros to
    :func:`bucket_size` (padding examples do not change the others' outputs: inference
    normalises with stored statistics). Each (stage, batch size) is one jitted
    program, compiled on first use within the process's memory-map budget
    (:class:`sdpoint_jax.xla_cpu.memory_maps.FirstCalls`: a program that would pass
    ``vm.max_map_count`` raises :class:`~sdpoint_jax.errors.MemoryMapLimitError`).

    Args:
      model: the trained model.
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model``.
      stages: ``k >= 1`` instances, cheapest first (e.g. from :func:`cascade_stages`).
      thresholds: ``(k,)`` confidence thresholds (from
        :func:`sdpoint_jax.evaluation.budget.fit_thresholds`); a sample stops at stage ``i`` when
        its top probability is ``>= thresholds[i]``; the last stage takes every sample
        left, whatever its threshold.
      reuse_prefix: start later stages from earlier stages' prefixes; ``False``: every
        stage from the image (the ``"summed"`` accounting).
    """

    def __init__(
        self,
        model: SDPointModel,
        variables: Any,
        stages: Sequence[Instance],
        thresholds: np.ndarray | Sequence[float],
        *,
        reuse_prefix: bool = True,
    ) -> None:
        if not stages:
            raise ValueError("a cascade needs at least one stage, got none")
        self.stages = tuple(model.space.validate(stage) for stage in stages)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.shape != (len(self.stages),) or np.isnan(self.thresholds).any():
            raise ValueError(
                f"need {len(self.stages)} thresholds (one per stage, no NaN), got "
                f"{self.thresholds.tolist()}"
            )
        self.plan = prefix_plan(self.stages, model.space, model.bn_mode, reuse=reuse_prefix)
        self.variables = jax.device_put(variables)
        self._staged = _staged_fn(model)
        self._first_calls = FirstCalls()

    def __call__(self, images: np.ndarray | jax.Array) -> CascadeOutput:
        """Classifies ``images`` float32 ``(B, H, W, 3)``, ``B >= 1``."""
        images = np.asarray(images)
        if images.ndim != 4 or not len(images):
            raise ValueError(f"need images (B >= 1, H, W, 3), got shape {images.shape}")
        batch = len(images)
        probs: np.ndarray | None = None  # allocated once stage 1 gives the class count
        stage = np.empty(batch, np.int64)
        remaining = np.arange(batch)
        evaluated, batch_sizes = [], []
        kept: dict[int, np.ndarray] = {0: images}  # point -> map at its tap, per sample
        for index, (instance, run) in enumerate(zip(self.stages, self.plan, strict=True)):
            if not len(remaining):
                evaluated.append(0)
                batch_sizes.append(0)
                continue
            size = batch if index == 0 else bucket_size(len(remaining), batch)
            source = kept[run.start]
            inputs = np.zeros((size, *source.shape[1:]), source.dtype)
            inputs[: len(remaining)] = source[remaining]
            with self._first_calls((index, inputs.shape, images.shape[1:3])):
                out, captured = self._staged(
                    self.variables, inputs, instance, run.start, run.capture, images.shape[1:3]
                )
            if run.capture:
                kept[run.capture] = np.zeros((batch, *captured.shape[1:]), captured.dtype)
                kept[run.capture][remaining] = np.asarray(captured)[: len(remaining)]
            out = np.asarray(out)[: len(remaining)]
            if probs is None:
                probs = np.empty((batch, out.shape[-1]), np.float32)
            probs[remaining] = out
            evaluated.append(len(remaining))
            batch_sizes.append(size)
            last = index == len(self.stages) - 1
            stops = np.ones(len(remaining), bool) if last else out.max(-1) >= self.thresholds[index]
            stage[remaining[stops]] = index
            remaining = remaining[~stops]
        return CascadeOutput(probs, stage, tuple(evaluated), tuple(batch_sizes))
