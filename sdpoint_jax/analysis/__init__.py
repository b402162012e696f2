"""The paper's analyses of trained runs (Kuen et al., 2018, Sect. 6.2.3 and Fig. 5).

* :mod:`sdpoint_jax.analysis.scale`: scale sensitivity, the mean pairwise cosine
  similarity of class probabilities across 7 pre-crop scales of the test images
  (``scale_sensitivity.csv`` and ``.png``), for one or more runs (SDPoint vs. baseline).
* :mod:`sdpoint_jax.analysis.difficulty`: cost-dependent difficulty, every test image
  grouped by the cheapest instance (in FLOPs) that classifies it correctly
  (``difficulty.csv`` and ``difficulty_groups.png``).

Command line: ``python -m sdpoint_jax.analysis {scale,difficulty} ...`` (see
:mod:`sdpoint_jax.analysis.__main__`). Both read a run directory written by
``python -m sdpoint_jax.main train`` with the statistics ``evaluate`` uses
(:func:`sdpoint_jax.training.run.restore_for_evaluation`): the calibrated ones when they
belong to the latest training step, else the checkpoint's running averages. The
analyses run in a single process (on every local device of it, batches split over the
devices as in ``evaluate``).

This module holds what both analyses share: the one-process check and reading the
first test images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported on use: it loads TensorFlow, which __main__ quiets first
    from sdpoint_jax.training.run import Run

Batch = dict[str, np.ndarray]
Row = dict[str, Any]


def check_one_process() -> None:
    """Raises ``ValueError`` unless this is the only JAX process (the analyses run in
    one)."""
    import jax

    if jax.process_count() > 1:
        raise ValueError(f"the analyses run in one process, not {jax.process_count()}")


def analysis_batches(run: Run, images: int | None = None) -> Iterator[Batch]:
    """The first ``images`` examples (default: all) of ``config.data.eval_split``, in order.

    Yields evaluation batches ``{"image": float32 (B, S, S, 3) normalised, "label": int32
    (B,), "mask": float32 (B,)}`` as :func:`sdpoint_jax.data.eval_batches` does; examples
    past ``images`` get ``mask == 0`` and iteration stops once ``images`` real examples are
    out. ``B`` is ``config.data.eval_batch_size``, or less when ``images`` is smaller (rounded
    up to a multiple of the number of devices).
    """
    from sdpoint_jax.data import pipeline

    config = run.config
    if images is not None and images <= 0:
        raise ValueError(f"images must be positive, got {images}")
    batch_size = config.data.eval_batch_size
    if images is not None:
        batch_size = min(batch_size, math.ceil(images / run.mesh.size) * run.mesh.size)
    batches = pipeline.eval_batches(
        config.data.dataset,
        global_batch_size=batch_size,
        split=config.data.eval_split,
        data_dir=config.data.data_dir,
    )
    seen = 0
    for batch in batches:
        if images is not None:
            mask = batch["mask"].copy()
            mask[max(images - seen, 0) :] = 0.0  # real examples precede the padding
            batch = {**batch, "mask": mask}
        seen += int(np.sum(batch["mask"] > 0))
        yield batch
        if images is not None and seen >= images:
            return
