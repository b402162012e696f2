"""Data parallelism: one mesh over every device of every host, batch on ``"data"``.

Parameters and batch-norm statistics are replicated; batches are split along their
leading axis. Under ``jax.jit`` the batch-norm batch statistics of a sharded batch are
global (XLA inserts the cross-device reductions), so no ``axis_name`` is needed.

A multi-process job is joined by :func:`initialize_distributed` (the command-line
runner calls it before the commands that train, calibrate or evaluate), in one of two ways:

* explicitly, from three environment variables, all required once
  ``JAX_COORDINATOR_ADDRESS`` is set: ``JAX_COORDINATOR_ADDRESS`` (``HOST:PORT`` of
  process 0), ``JAX_NUM_PROCESSES`` (an integer >= 1) and ``JAX_PROCESS_ID`` (an
  integer in ``[0, JAX_NUM_PROCESSES)``); ``python -m sdpoint_jax.launch`` sets them for
  local processes;
* by JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU VMs) when none of
  the three is set and such a cluster is found.

Multi-process jobs use gloo for collectives between CPU devices (JAX's CPU backend has
none across processes otherwise); GPU and TPU devices use their own.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
ADDRESS_VARIABLE = "JAX_COORDINATOR_ADDRESS"
COUNT_VARIABLE = "JAX_NUM_PROCESSES"
ID_VARIABLE = "JAX_PROCESS_ID"
LAUNCH_VARIABLES = (ADDRESS_VARIABLE, COUNT_VARIABLE, ID_VARIABLE)


class LaunchError(ValueError):
    """The launch environment variables are missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a job: ``coordinator`` (``HOST:PORT``), ``processes``,
    ``process_id``; ``cluster`` names the detected cluster (``None``: the variables)."""

    coordinator: str | None
    processes: int
    process_id: int
    cluster: str | None = None


def _integer(name: str, text: str, low: int, high: int | None) -> int:
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not {allowed}") from None
    if value < low or (high is not None and value >= high):
        raise LaunchError(f"{name}={value} is not {allowed}")
    return value


def launch_from_environment(environ: dict[str, str] | None = None) -> Launch | None:
    """The :class:`Launch` the variables describe (see the module docstring), ``None``
    when none of them is set.

    Raises:
      LaunchError: one is missing or malformed (the message names it and what it
        allows).
    """
    environ = os.environ if environ is None else environ
    given = [name for name in LAUNCH_VARIABLES if environ.get(name, "") != ""]
    if not given:
        return None
    missing = [name for name in LAUNCH_VARIABLES if name not in given]
    if missing:
        raise LaunchError(
            f"{', '.join(given)} set but {' and '.join(missing)} missing: a multi-process "
            f"launch needs all of {', '.join(LAUNCH_VARIABLES)}"
        )
    address = environ[ADDRESS_VARIABLE]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(
            f"{ADDRESS_VARIABLE}={address!r} is not HOST:PORT with a port in [1, 65535]"
        )
    processes = _integer(COUNT_VARIABLE, environ[COUNT_VARIABLE], 1, None)
    process_id = _integer(ID_VARIABLE, environ[ID_VARIABLE], 0, processes)
    return Launch(address, processes, process_id)


def detected_cluster() -> Launch | None:
    """The job of a cluster JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU VM;
    mpi4py only on request, as in JAX), ``None`` when there is none."""
    from jax._src.clusters import ClusterEnv  # JAX's detection; no public API names it

    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return Launch(None, env.get_process_count(), env.get_process_id(), env.__name__)
    return None


def initialize_distributed() -> Launch | None:
    """Joins the multi-process job this process is launched in (see the module
    docstring); returns how, or ``None`` for a single process on its own (nothing is
    done). Must run before JAX first uses a device.

    Raises:
      LaunchError: bad launch variables (before JAX is touched).
    """
    launch = launch_from_environment() or detected_cluster()
    if launch is None:
        return None
    if launch.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=launch.coordinator,
        num_processes=launch.processes if launch.cluster is None else None,
        process_id=launch.process_id if launch.cluster is None else None,
    )
    return launch


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
    batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, *, ahead: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """:func:`shard_batch` of every batch, ``ahead`` batches placed beyond the one
    yielded (prefetch to device: their transfers overlap the consumer's work)."""
    placed: collections.deque[dict[str, jax.Array]] = collections.deque()
    for batch in batches:
        placed.append(shard_batch(batch, mesh))
        if len(placed) > ahead:
            yield placed.popleft()
    yield from placed


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree of arrays to every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``tree``'s shapes and dtypes (arrays or ``jax.ShapeDtypeStruct``) as
    ``jax.ShapeDtypeStruct`` leaves placed with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
