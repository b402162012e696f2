"""sdpoint_jax: SDPoint (Kuen et al., CVPR 2018) in JAX/Flax."""

from __future__ import annotations

from typing import Any

# first: it notes the user's log settings before JAX (imported by any other module) sets
# its own
from sdpoint_jax import startup  # noqa: F401

__all__ = ["DEFAULT_RATIOS", "Instance", "InstanceSpace"]


def __getattr__(name: str) -> Any:
    """The names of :data:`__all__` (from :mod:`sdpoint_jax.core.instance`), imported
    on first use: ``python -m sdpoint_jax.X`` imports this package before the program,
    which may restart itself (:func:`sdpoint_jax.startup.start_program`) before it
    needs JAX."""
    if name in __all__:
        from sdpoint_jax.core import instance

        return getattr(instance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
