"""sdpoint_jax: SDPoint (Kuen et al., CVPR 2018) in JAX/Flax."""

# first: it notes the user's log settings before JAX, imported next, sets its own
from sdpoint_jax import startup  # noqa: F401
from sdpoint_jax.core.instance import DEFAULT_RATIOS, Instance, InstanceSpace

__all__ = ["DEFAULT_RATIOS", "Instance", "InstanceSpace"]
