"""Budgeted batch classification over a sequence of stages (MSDNet, Huang et al.
ICLR 2018, Sect. 5; IMTA, Li et al. ICCV 2019, Sect. 4).

A stage is anything that yields class probabilities for a sample at a known cost: an
exit of an early-exit network (:mod:`sdpoint_jax.compare.early_exit`) or an SDPoint
instance of a cascade (:mod:`sdpoint_jax.evaluation.cascade`). Every sample goes through stages
``1, 2, ..`` in order and stops at the first one whose top softmax probability reaches
that stage's threshold; the last stage takes every sample left. ``stage_gflops[i]`` is
the cost of a sample that stops at stage ``i``, everything it ran before included.

:func:`fit_thresholds` picks the thresholds on held-out training data for a target
average cost, :func:`budgeted_stops` says where each sample stops and
:func:`budgeted_eval` measures the resulting average cost and error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def geometric_exit_distribution(log_p: float, num_stages: int) -> np.ndarray:
    """MSDNet's distribution of stopping stages ``q_i ∝ p^i`` (``i = 1..k``) as ``(k,)``
    probabilities, computed from ``log p`` in log space (stable for any ``p > 0``)."""
    logits = log_p * np.arange(1, num_stages + 1, dtype=np.float64)
    q = np.exp(logits - logits.max())
    return q / q.sum()


def fit_thresholds(
    probs_per_stage: np.ndarray,
    stage_gflops: np.ndarray | Sequence[float],
    target_avg_gflops: float,
) -> np.ndarray:
    """Confidence thresholds for a target average cost (MSDNet's budgeted batch
    classification, as in the authors' and IMTA's ``dynamic_eval_find_threshold``).

    1. The fraction of samples stopping at stage ``i`` follows ``q_i ∝ p^i``; ``p`` is
       found by bisection (on ``log p``) so that ``sum_i q_i * stage_gflops[i]`` equals
       the target.
    2. Going through stages ``1..k-1``, the threshold of stage ``i`` is the top softmax
       probability of the ``m``-th most confident sample not stopped yet, ``m`` being
       the number the quota ``round(N * (q_1 + .. + q_i))`` leaves for stage ``i``
       (``+inf`` when it is 0). Cumulative rounding keeps the fit set's realised
       stopping fractions within ``1 / N`` of ``q`` (MSDNet floors each quota
       separately). Ties at a threshold let a few more samples stop.

    Args:
      probs_per_stage: softmax probabilities ``(k, N, classes)`` of a held-out part of
        the training set.
      stage_gflops: ``(k,)`` cost of a sample stopping at each stage, the stages it ran
        before included.
      target_avg_gflops: the target, between the limits ``stage_gflops[0]`` (every
        sample stops at stage 1) and ``stage_gflops[-1]`` (every sample at stage ``k``).

    Returns:
      thresholds ``(k,)``; the last is ``-inf`` (stage ``k`` takes every sample left).
    """
    probs = np.asarray(probs_per_stage, dtype=np.float64)
    costs = np.asarray(stage_gflops, dtype=np.float64)
    if probs.ndim != 3 or costs.shape != probs.shape[:1]:
        raise ValueError(
            f"need probs (k, N, classes) and stage_gflops (k,), got {probs.shape} and {costs.shape}"
        )
    low, high = sorted((costs[0], costs[-1]))
    if not low <= target_avg_gflops <= high:
        raise ValueError(
            f"target {target_avg_gflops} GFLOPs outside [{low}, {high}], the costs of "
            f"stopping every sample at the first or at the last stage"
        )
    k, n = probs.shape[:2]

    def expected_cost(log_p: float) -> float:
        return float(geometric_exit_distribution(log_p, k) @ costs)

    # log p = -/+ 60 put all but ~e^-60 of the mass on the first/last stage
    lo, hi = -60.0, 60.0
    increasing = expected_cost(hi) >= expected_cost(lo)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if (expected_cost(mid) < target_avg_gflops) == increasing:
            lo = mid
        else:
            hi = mid
    q = geometric_exit_distribution(0.5 * (lo + hi), k)

    confidence = probs.max(axis=-1)
    quota = np.rint(np.cumsum(q) * n).astype(np.int64)
    thresholds = np.full(k, -np.inf)
    remaining = np.ones(n, dtype=bool)
    for i in range(k - 1):
        take = min(quota[i] - (n - int(remaining.sum())), int(remaining.sum()))
        if take <= 0:
            thresholds[i] = np.inf
            continue
        thresholds[i] = np.sort(confidence[i, remaining])[::-1][take - 1]
        remaining &= confidence[i] < thresholds[i]
    return thresholds


def budgeted_stops(
    probs_per_stage: np.ndarray, thresholds: np.ndarray | Sequence[float]
) -> np.ndarray:
    """Index ``0..k-1`` ``(N,)`` of the stage each sample stops at: the first whose top
    softmax probability is ``>=`` its threshold, else the last (whatever its threshold).

    Args:
      probs_per_stage: softmax probabilities ``(k, N, classes)``.
      thresholds: ``(k,)``, e.g. from :func:`fit_thresholds`.
    """
    probs = np.asarray(probs_per_stage)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if probs.ndim != 3 or thresholds.shape != probs.shape[:1]:
        raise ValueError(
            f"need probs (k, N, classes) and thresholds (k,), got {probs.shape} and "
            f"{thresholds.shape}"
        )
    stops = probs.max(axis=-1) >= thresholds[:, None]
    stops[-1] = True
    return np.argmax(stops, axis=0)


def budgeted_eval(
    probs_per_stage: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray | Sequence[float],
    stage_gflops: np.ndarray | Sequence[float],
) -> tuple[float, float]:
    """Average GFLOPs and top-1 error (%) when each sample stops at the stage
    :func:`budgeted_stops` gives and is classified by that stage's top probability.

    Args:
      probs_per_stage: softmax probabilities ``(k, N, classes)``.
      labels: integer labels ``(N,)``.
      thresholds: ``(k,)``, e.g. from :func:`fit_thresholds`.
      stage_gflops: ``(k,)`` cost of a sample stopping at each stage.
    """
    probs = np.asarray(probs_per_stage)
    labels = np.asarray(labels)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    costs = np.asarray(stage_gflops, dtype=np.float64)
    k, n = probs.shape[:2]
    if labels.shape != (n,) or thresholds.shape != (k,) or costs.shape != (k,):
        raise ValueError(
            f"probs {probs.shape} need labels ({n},), thresholds and stage_gflops ({k},); "
            f"got {labels.shape}, {thresholds.shape}, {costs.shape}"
        )
    stop = budgeted_stops(probs, thresholds)
    predictions = np.argmax(probs[stop, np.arange(n)], axis=-1)
    return float(costs[stop].mean()), float(100.0 * np.mean(predictions != labels))
