"""Statistics over seeds: mean and sample standard deviation, and paired differences
with a Student-t confidence interval.

Runs of two methods at the same seed share their data order and initialisation seed,
so they are compared pairwise (:func:`paired_difference`): the per-seed differences
cancel what the seed does to both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import stdtrit  # Student-t quantile; lighter to import than scipy.stats

CONFIDENCE = 0.95


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "mean", "std"}`` of ``values``: ``std`` is the sample standard deviation
    (``n - 1`` in the denominator), None for a single value.

    Raises:
      ValueError: no values.
    """
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("no values to summarize")
    std = float(np.std(values, ddof=1)) if values.size > 1 else None
    return {"n": int(values.size), "mean": float(np.mean(values)), "std": std}


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided ``confidence`` Student-t interval of the mean of ``values``:
    ``mean -+ t_{(1 + confidence) / 2, n - 1} * std / sqrt(n)``.

    Raises:
      ValueError: fewer than two values, or ``confidence`` outside ``(0, 1)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    summary = summarize(values)
    if summary["std"] is None:
        raise ValueError(f"a confidence interval needs at least 2 values, got {summary['n']}")
    half = stdtrit(summary["n"] - 1, (1.0 + confidence) / 2.0) * summary["std"]
    half /= math.sqrt(summary["n"])
    return summary["mean"] - half, summary["mean"] + half


def paired_difference(
    treated: Mapping[int, float], control: Mapping[int, float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """``treated - control`` paired by seed (the seeds both have): ``{"seeds", "n",
    "mean", "std", "ci_low", "ci_high"}``; the interval (:func:`t_interval`) is None
    with fewer than two pairs.

    Raises:
      ValueError: no seed in common.
    """
    seeds = sorted(set(treated) & set(control))
    if not seeds:
        raise ValueError(f"no seed in common to pair: {sorted(treated)} and {sorted(control)}")
    differences = [treated[seed] - control[seed] for seed in seeds]
    low, high = t_interval(differences, confidence) if len(seeds) > 1 else (None, None)
    return {"seeds": seeds, **summarize(differences), "ci_low": low, "ci_high": high}
