"""Multiscale training (the paper's "MS" baseline, Sect. 6.1.1).

Every training step bilinearly resizes the input batch to a random integer size
``s x s``, ``s`` uniform in ``[min_size, max_size]`` (CIFAR: 16..32, step 1 pixel),
drawn as a pure function of ``(seed, step)``. Batch-norm statistics are kept per input
size ("instance-specific BN statistics"). At inference the full-size images are
resized to the chosen size ``s``, trading accuracy for cost like an SDPoint instance.

The network is a plain registry model (SDPoint unused: always ``Instance.full()``)
with ``bn_mode="uniform"``, so each of its BN layers owns one statistics key. The
variables are::

    {"params": <the model's params>,
     "batch_stats": {"s16": <the model's batch_stats tree>, ..., "s32": <...>}}

one complete ``batch_stats`` tree per size in ``[min_size, max_size]`` (key
:func:`stats_key`), all created by :meth:`MultiscaleMethod.init_variables`; a step
at size ``s`` reads and updates ``"s{s}"`` only.

Resizing is :func:`jax.image.resize` with ``"bilinear"`` interpolation on device
inside the traced loss/logits, without antialiasing by default (half-pixel centres,
like PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``, the authors'
framework); a size equal to the input size is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdpoint_jax.compare.method import Method, Variables
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training.trainee import cross_entropy, fresh_variables

_FULL = Instance.full()


def stats_key(size: int) -> str:
    """The ``batch_stats`` entry of input size ``size`` (e.g. ``"s16"``)."""
    return f"s{size}"


def resize(images: jax.Array, size: int, *, antialias: bool = False) -> jax.Array:
    """Bilinear resize of ``images`` ``(B, H, W, C)`` to ``(B, size, size, C)``."""
    batch, height, width, channels = images.shape
    if (height, width) == (size, size):
        return images
    return jax.image.resize(
        images, (batch, size, size, channels), method="bilinear", antialias=antialias
    )


class MultiscaleMethod(Method):
    """Multiscale training of a plain network; settings are input sizes (``int``).

    Args:
      model_name: registry name (e.g. ``"wrn-16-1"``, ``"wrn-28-10"``).
      num_classes: classifier outputs.
      min_size, max_size: training sizes, inclusive (CIFAR: 16 and 32).
      eval_sizes: sizes evaluated at inference, each within ``[min_size, max_size]``;
        default every second pixel from ``min_size`` plus ``max_size``
        (16, 18, ..., 32 on CIFAR: 9 settings). Evaluated cheapest first.
      antialias: antialiased downsampling in :func:`jax.image.resize` (default off,
        plain bilinear interpolation as in the paper).
      name: the method's name in ``compare.csv``.
      **model_kwargs: further model fields (``dtype``, ...);
        ``bn_mode`` is always ``"uniform"``.
    """

    def __init__(
        self,
        model_name: str = "wrn-16-1",
        num_classes: int = 10,
        *,
        min_size: int = 16,
        max_size: int = 32,
        eval_sizes: Sequence[int] | None = None,
        antialias: bool = False,
        name: str = "multiscale",
        **model_kwargs: Any,
    ) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError(
                f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}"
            )
        if eval_sizes is None:
            eval_sizes = (*range(min_size, max_size, 2), max_size)
        eval_sizes = tuple(sorted({int(s) for s in eval_sizes}))
        outside = [s for s in eval_sizes if not min_size <= s <= max_size]
        if not eval_sizes or outside:
            raise ValueError(
                f"eval_sizes must be a non-empty subset of the training sizes "
                f"{min_size}..{max_size}, got {eval_sizes}"
            )
        self.name = name
        self.min_size = min_size
        self.max_size = max_size
        self.sizes = tuple(range(min_size, max_size + 1))
        self.eval_sizes = eval_sizes
        self.antialias = antialias
        self.model = create(model_name, num_classes=num_classes, bn_mode="uniform", **model_kwargs)

    def init_variables(self, key: jax.Array, image_size: int) -> Variables:
        """Parameters (independent of the input size: global average pooling) and one
        fresh ``batch_stats`` tree per training size."""
        variables = fresh_variables(self.model, key, image_size, instance=_FULL)
        stats = variables["batch_stats"]
        # distinct buffers per size, so the trees can be donated to a jitted step
        return {
            "params": variables["params"],
            "batch_stats": {stats_key(s): jax.tree.map(jnp.copy, stats) for s in self.sizes},
        }

    def train_setting(self, seed: int, step: int) -> int:
        """Input size of step ``step``: uniform in ``[min_size, max_size]``."""
        rng = np.random.default_rng([seed, step])
        return int(rng.integers(self.min_size, self.max_size + 1))

    def program_keys(self) -> list[int]:
        """Every training input size."""
        return list(self.sizes)

    def loss(
        self,
        params: Any,
        variables: Variables,
        batch: dict[str, jax.Array],
        setting: int,
        key: jax.Array,
    ) -> tuple[jax.Array, tuple[Variables, jax.Array]]:
        """Cross-entropy of ``batch`` resized to ``setting``; only that size's
        statistics are updated (``key`` is unused: the size is the step's only
        randomness)."""
        del key
        size = self._check(setting)
        stats = variables["batch_stats"]
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": stats[stats_key(size)]},
            resize(batch["image"], size, antialias=self.antialias),
            instance=_FULL,
            train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, batch["label"])
        new_stats = {**stats, stats_key(size): updates["batch_stats"]}
        return loss, ({"batch_stats": new_stats}, logits)

    def eval_settings(self) -> Sequence[int]:
        return self.eval_sizes

    def logits(self, variables: Variables, images: jax.Array, setting: int) -> jax.Array:
        """Logits ``(B, classes)`` of ``images`` resized to ``setting``, normalised with
        that size's running statistics."""
        size = self._check(setting)
        return self.model.apply(
            {
                "params": variables["params"],
                "batch_stats": variables["batch_stats"][stats_key(size)],
            },
            resize(images, size, antialias=self.antialias),
            instance=_FULL,
            train=False,
        )

    def gflops(self, setting: int, image_size: int) -> float:
        """GFLOPs of the network on one ``setting x setting`` input; the resize from
        ``image_size`` is preprocessing and not counted."""
        del image_size
        size = self._check(setting)
        return count_flops(self.model, _FULL, (size, size)) / 1e9

    def describe(self, setting: int) -> str:
        return f"{setting}px"

    def _check(self, setting: Any) -> int:
        if setting not in self.sizes:
            raise ValueError(
                f"{self.name}: size {setting!r} has no batch-norm statistics; "
                f"expected one of {self.min_size}..{self.max_size}"
            )
        return int(setting)
