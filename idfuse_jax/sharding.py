"""Device mesh, sharding rules and multi-host input.

One Mesh with axes ("subject", "data", "fsdp"). Subjects trained together are split over
"subject": each subject's trainable state (LoRA, adapter, FFM and their optimiser moments),
features and batch live on its slice of the mesh. A subject's batch is split over "data" and
"fsdp"; frozen weights are shared by every subject and split over "fsdp" along their largest
divisible dimension (FSDP: XLA all-gathers them where used).

Multi-host: the mesh spans every process's devices, and no process may place data on another's.
Host (numpy) values go through `put` (each process hands its own devices their slices); values
computed on device go through `replicate` (a jitted copy with an output sharding).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idfuse_jax.errors import ConfigError
from idfuse_jax.formats import LazyArray
from idfuse_jax.models import placement

MESH_AXES = ("subject", "data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # a subject's batch


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
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as e:  # no coordinator found: not on a TPU slice or cluster
            raise ConfigError(
                f"config.multihost=true: {e}; set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID (launch/gpu_node.sh does) or run under SLURM or on a TPU slice"
            ) from None
        logging.info(
            "process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )


def mesh_shape(data: int, fsdp: int, num_devices: int, subject: int = 1) -> tuple[int, int, int]:
    """Resolve the ("subject", "data", "fsdp") sizes; one of them may be -1 to take the
    remaining devices."""
    sizes = {"subject": subject, "data": data, "fsdp": fsdp}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"only one of mesh.{', mesh.'.join(free)} can be -1")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} must be a positive size or -1")
    if free:
        known = math.prod(size for size in sizes.values() if size != -1)
        if num_devices % known:
            raise ConfigError(f"mesh size {known} does not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        shape = " x ".join(f"{name}={size}" for name, size in sizes.items())
        raise ConfigError(
            f"mesh {shape} = {math.prod(sizes.values())} devices, but {num_devices} are present"
        )
    return sizes["subject"], sizes["data"], sizes["fsdp"]


def make_mesh(
    data: int, fsdp: int, devices: Sequence[jax.Device] | None = None, *, subject: int = 1
) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices), subject)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def jit_on(
    mesh: Mesh | None, fn: Callable, batch_axes: Sequence[str] = MESH_AXES, **jit_kwargs: Any
) -> Any:
    """`jax.jit(fn, **jit_kwargs)` for a model program over `mesh`: traced with the models
    placed there (`models.placement`), so that its kernels are those of the mesh's devices (not
    the host's) and its fused attention splits its batch over `batch_axes`. None: one device."""
    if mesh is not None:
        fn = placement.traced_on(fn, mesh, batch_axes)
    return jax.jit(fn, **jit_kwargs)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of a tree's first leaf laid out by a NamedSharding, or None."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes ("data", "fsdp")."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def subject_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (subject) dimension split over "subject"; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("subject"))


def subject_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[subjects, batch, ...]: subjects over "subject", each subject's batch over the batch axes."""
    return NamedSharding(mesh, PartitionSpec("subject", BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % n:
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by the {n} devices of a subject's "
            f"slice of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); "
            "change one of them"
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


def sync_processes(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here: a host barrier through jax's coordination service.

    Before the first collective after work whose time varies between hosts (compiles: on CPU,
    only process 0 gets hits from the persistent compilation cache, which it alone writes, as the
    other processes' keys differ): CPU collectives (gloo) give up on a peer 30 s late.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.sync_global_processes(
        name, timeout=timeout_s, processes=set(range(jax.process_count()))
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A full copy of each leaf on every device of `mesh`, which may span processes.

    For values every process computed identically on device (initial state, keys, subject
    features): every process runs the same copy program, each filling its own devices.
    `jax.device_put` cannot do this once the mesh has devices of other processes.
    """
    return reshard(tree, replicated(mesh))


def reshard(tree: Any, out_sharding: NamedSharding) -> Any:
    """`tree` laid out by `out_sharding`, through a jitted copy that every process runs."""
    return jax.jit(lambda t: t, out_shardings=out_sharding)(tree)


def any_process(mesh: Mesh) -> Callable[[bool], bool]:
    """A function: whether any process passed True. Compiled now, so that calling it later
    compiles nothing (a process busy compiling would be late to the collective)."""
    sharding = NamedSharding(mesh, PartitionSpec(MESH_AXES))  # one element per device
    flags = jax.ShapeDtypeStruct((mesh.size,), np.int32, sharding=sharding)
    reduce = jax.jit(lambda x: x.max(), out_shardings=replicated(mesh)).lower(flags).compile()
    num_local = len(mesh.local_devices)

    def any_(value: bool) -> bool:
        local = np.full((num_local,), int(value), np.int32)
        return bool(reduce(jax.make_array_from_process_local_data(sharding, local)))

    return any_


def global_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch [subjects, batch] (identical on every process) as one array, subjects
    split over "subject" and each subject's batch over the batch axes."""
    return put(batch, subject_batch_sharding(mesh))
