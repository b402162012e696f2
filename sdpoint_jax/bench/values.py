"""Stand-in values for timing: what a program costs does not depend on its inputs' values.

Zeros keep every computation finite (no NaN or denormal slow paths) and cost no
compilation, unlike running a model's initialisers (seconds per model on a CPU).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def zeros_like(abstract: Any) -> Any:
    """Host (numpy) zeros shaped like the leaves of ``abstract`` (anything with ``shape``
    and ``dtype``, e.g. the ``jax.ShapeDtypeStruct`` tree of ``jax.eval_shape``)."""
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
