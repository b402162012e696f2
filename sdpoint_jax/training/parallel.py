"""Data parallelism: one mesh over every device of every host, batch on ``"data"``.

Parameters and batch-norm statistics are replicated; batches are split along their
leading axis. Under ``jax.jit`` the batch-norm batch statistics of a sharded batch are
global (XLA inserts the cross-device reductions), so no ``axis_name`` is needed.
Multi-host runs call :func:`initialize_distributed` first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Joins a multi-host job when launched as one (a no-op on a single host).

    ``jax.distributed.initialize()`` finds the coordinator on Cloud TPU, SLURM and
    other supported clusters, or from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    """
    if "JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    if global_batch_size % mesh.size:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{mesh.size} devices of the mesh"
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this host's part of a global batch on the mesh, split on ``"data"``."""
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, value)
        for name, value in batch.items()
    }


def shard_batches(
    batches: Iterable[dict[str, np.ndarray]], mesh: Mesh
) -> Iterator[dict[str, jax.Array]]:
    """:func:`shard_batch` of every batch, lazily."""
    for batch in batches:
        yield shard_batch(batch, mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree of arrays to every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
