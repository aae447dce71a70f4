"""Device mesh, sharding rules and multi-host input.

One Mesh with axes ("data", "fsdp"). The batch is split over both axes; frozen weights are split
over "fsdp" along their largest divisible dimension (FSDP: XLA all-gathers them where used);
trainable state (LoRA, adapter, FFM and their optimiser moments) is small and replicated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idfuse_jax.errors import ConfigError
from idfuse_jax.formats import LazyArray

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(multihost: bool) -> None:
    """Start the multi-host runtime (TPU pods, multi-node GPUs) when asked.

    On TPU VMs and under SLURM/Open MPI, `jax.distributed.initialize()` finds the coordinator
    itself; elsewhere set JAX_COORDINATOR_ADDRESS (read by jax), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (read here), as launch/gpu_node.sh does.
    """
    if multihost:
        kwargs = {}
        for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if os.environ.get(env):
                kwargs[arg] = int(os.environ[env])
        jax.distributed.initialize(**kwargs)
        logging.info(
            "process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolve the ("data", "fsdp") sizes; one of them may be -1 to take the remaining devices."""
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh.data and mesh.fsdp cannot both be -1")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} must be a positive size or -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            raise ConfigError(f"mesh size {known} does not divide the {num_devices} devices")
        data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
    if data * fsdp != num_devices:
        raise ConfigError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {num_devices} are present"
        )
    return data, fsdp


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % n:
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by the {n} devices of the mesh "
            f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); change one of them"
        )


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """Split the largest dimension divisible by the fsdp size; replicate when none is."""
    if fsdp_size == 1:
        return PartitionSpec()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = -max(candidates)[1]  # largest size; earliest dimension on ties
    spec: list[Any] = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for frozen weights: each leaf split over "fsdp" where it divides."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size)), tree)


def put(tree: Any, shardings: Any) -> Any:
    """Place host (or device) arrays with the given shardings, each device taking only its shard.

    Every process holds the whole array and hands over the slices its own devices need: no
    unsharded copy lands on one device, and no cross-host check of the values is needed.
    `LazyArray` leaves (weights still on disk) are read one at a time, placed and dropped, so
    host memory holds about one tensor beyond what is already placed.
    """

    def place(x, sharding):
        if isinstance(x, LazyArray):
            x = x.load()
        elif not isinstance(x, jax.Array):
            x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree, shardings)


def global_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch (identical on every process) as one array split over the batch axes."""
    return put(batch, batch_sharding(mesh))
