"""sdpoint_jax: SDPoint (Kuen et al., CVPR 2018) in JAX/Flax."""

from sdpoint_jax.core.instance import DEFAULT_RATIOS, Instance, InstanceSpace

__all__ = ["DEFAULT_RATIOS", "Instance", "InstanceSpace"]
