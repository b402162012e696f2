"""SDPoint instances: where (point p) and how much (ratio r) a network downsamples.

An instance ``(p, r)`` average-pools the feature map right after basic building block
``p`` to ``round(r * size)``; ``p = 0`` is the unmodified network (Kuen et al., 2018,
Sect. 4 and Algorithm 1). Instances are immutable and hashable so they can be passed
to ``jax.jit`` as static arguments: every instance compiles into its own XLA program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np

DEFAULT_RATIOS: tuple[float, ...] = (0.5, 0.75)

FULL_KEY = "full"
"""Name of the batch-norm statistics shared by every instance whose input to a layer
is the full-size feature map (see :mod:`sdpoint_jax.core.norm`)."""


@dataclasses.dataclass(frozen=True, order=True)
class Instance:
    """One SDPoint instance.

    Attributes:
      point: index ``p`` of the building block after which the feature map is pooled;
        ``0`` means no stochastic downsampling (the full-cost network).
      ratio: downsampling ratio ``r`` in ``(0, 1)``; for ``point == 0`` it is
        normalised to ``1.0`` so that every spelling of the full network is one instance.
    """

    point: int
    ratio: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.point, bool) or not isinstance(self.point, int | np.integer):
            raise ValueError(f"Instance point must be an integer >= 0, got {self.point!r}")
        if self.point < 0:
            raise ValueError(f"Instance point must be >= 0, got {self.point}")
        object.__setattr__(self, "point", int(self.point))
        ratio = float(self.ratio)
        if self.point == 0:
            ratio = 1.0
        elif not (0.0 < ratio < 1.0) or not math.isfinite(ratio):
            raise ValueError(
                f"Instance ratio must lie in the open interval (0, 1) for point "
                f"{self.point}, got {self.ratio!r}"
            )
        object.__setattr__(self, "ratio", ratio)

    @classmethod
    def full(cls) -> Instance:
        """The unmodified network (``p = 0``)."""
        return cls(0)

    @classmethod
    def parse(cls, text: str) -> Instance:
        """Parses ``"P:R"`` (e.g. ``"3:0.5"``) or ``"0"`` / ``"full"``."""
        text = text.strip()
        if text in ("0", FULL_KEY):
            return cls.full()
        point, sep, ratio = text.partition(":")
        try:
            if not sep:
                raise ValueError
            return cls(int(point), float(ratio))
        except ValueError as err:
            if "Instance" in str(err):
                raise
            raise ValueError(
                f"cannot parse instance {text!r}: expected 'P:R' such as '3:0.5', or 'full'"
            ) from None

    @property
    def is_full(self) -> bool:
        return self.point == 0

    @property
    def key(self) -> str:
        """Stable name used for this instance's batch-norm statistics, e.g. ``p3_r0p5``."""
        if self.is_full:
            return FULL_KEY
        return f"p{self.point}_r{self.ratio:g}".replace(".", "p")

    def __str__(self) -> str:
        return "full" if self.is_full else f"{self.point}:{self.ratio:g}"


@dataclasses.dataclass(frozen=True)
class InstanceSpace:
    """All instances of one model: points ``1..num_points`` times ``ratios``, plus full.

    Attributes:
      num_points: ``N``, the number of downsampling points of the model.
      ratios: the downsampling ratios ``R`` (default ``(0.5, 0.75)``, as in the paper).
    """

    num_points: int
    ratios: tuple[float, ...] = DEFAULT_RATIOS

    def __post_init__(self) -> None:
        if isinstance(self.num_points, bool) or not isinstance(self.num_points, int):
            raise ValueError(f"num_points must be an integer >= 0, got {self.num_points!r}")
        if self.num_points < 0:
            raise ValueError(f"num_points must be >= 0, got {self.num_points}")
        ratios = tuple(float(r) for r in self.ratios)
        if not ratios:
            raise ValueError("ratios must not be empty")
        for r in ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"every ratio must lie in (0, 1), got {r} in {self.ratios}")
        if len(set(ratios)) != len(ratios):
            raise ValueError(f"ratios must be distinct, got {self.ratios}")
        object.__setattr__(self, "ratios", ratios)

    def __iter__(self) -> Iterator[Instance]:
        """Full instance first, then points in forward order, ratios in given order."""
        yield Instance.full()
        for point in range(1, self.num_points + 1):
            for ratio in self.ratios:
                yield Instance(point, ratio)

    def __len__(self) -> int:
        return 1 + self.num_points * len(self.ratios)

    def __contains__(self, instance: object) -> bool:
        if not isinstance(instance, Instance):
            return False
        return instance.is_full or (
            instance.point <= self.num_points and instance.ratio in self.ratios
        )

    def validate(self, instance: Instance) -> Instance:
        """Returns ``instance`` if it belongs to this space, else raises ``ValueError``."""
        if not isinstance(instance, Instance):
            raise ValueError(f"expected an Instance, got {type(instance).__name__}: {instance!r}")
        if instance.point > self.num_points:
            raise ValueError(
                f"instance point {instance.point} is out of range: this model has points "
                f"0..{self.num_points} (0 = full network)"
            )
        if not instance.is_full and instance.ratio not in self.ratios:
            raise ValueError(
                f"instance ratio {instance.ratio:g} is not one of this model's ratios "
                f"{tuple(self.ratios)}"
            )
        return instance

    def sample(self, rng: jax.Array | np.random.Generator) -> Instance:
        """Draws one instance as in Algorithm 1 of the paper.

        ``p`` is uniform over ``{0, .., N}`` and ``r`` uniform over ``R``, drawn
        independently; ``p = 0`` yields the full network. We follow the paper: the
        authors' sampler draws the full network with probability ``2 / (N + 2)`` (its
        draws -1 and 0 both mean the full network) and never draws its ``blockID`` 0,
        the point after the first block.

        Args:
          rng: a ``numpy.random.Generator`` or a JAX PRNG key. Either way the draw
            happens on the host and returns a concrete (static) instance.
        """
        if isinstance(rng, np.random.Generator):
            point = int(rng.integers(0, self.num_points + 1))
            ratio_index = int(rng.integers(0, len(self.ratios)))
        else:
            point_key, ratio_key = jax.random.split(rng)
            point = int(jax.random.randint(point_key, (), 0, self.num_points + 1))
            ratio_index = int(jax.random.randint(ratio_key, (), 0, len(self.ratios)))
        if point == 0:
            return Instance.full()
        return Instance(point, self.ratios[ratio_index])

    def parse_list(self, text: str) -> list[Instance]:
        """Parses ``"all"`` or a comma-separated list such as ``"full,3:0.5,12:0.75"``."""
        if text.strip() == "all":
            return list(self)
        return [self.validate(Instance.parse(part)) for part in text.split(",") if part.strip()]


def downsampled_size(size: int, ratio: float) -> int:
    """Spatial size after SDPoint pooling: ``round(ratio * size)``.

    Python's ``round`` rounds half to even, as in the authors' code
    (``14 * 0.75 = 10.5 -> 10``, ``7 * 0.5 = 3.5 -> 4``).
    """
    return round(ratio * size)
