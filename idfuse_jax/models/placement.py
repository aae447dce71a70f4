"""Where a program runs: the platform and mesh of the devices it is compiled for, read by the
models while it is traced.

A program's kernels must be those of its devices, not of the host's default backend: a step
compiled on a CPU host for a TPU slice or for GPUs (`jax.experimental.topologies`) takes the
TPU's or the GPU's attention, and a Pallas or cuDNN kernel inside a program over several devices
runs under a `shard_map` of that mesh. So whoever jits a model program over a mesh traces it
inside `on(mesh, batch_axes)` (`traced_on` wraps a function so that its every trace is), and
everything platform-dependent in the models reads `current()`: the attention kernel
(`models.attention`) and the CPU scheduling ties (`models.backward`).

Outside such a context a program is taken to run on one device of the default backend (a plain
`jax.jit` of unsharded arrays).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class Placement:
    """The devices of the program being traced.

    platform: "cpu", "gpu" or "tpu" (the devices' `platform`);
    mesh: the mesh the program's arrays are laid out on; None for a single-device program;
    batch_axes: the mesh axes a kernel may split its batch (and then heads) over, in order; the
      others are taken by the caller (the subject axis of a `vmap(spmd_axis_name="subject")`);
    compute_capability: of a GPU ("9.0"), else None.
    """

    platform: str
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ()
    compute_capability: str | None = None

    @property
    def sharded(self) -> bool:
        """Whether the program spans several devices (kernels then go under a shard_map)."""
        return self.mesh is not None and self.mesh.size > 1


def of_devices(
    devices: Sequence[jax.Device], mesh: Mesh | None = None, batch_axes: Sequence[str] = ()
) -> Placement:
    """The placement of a program over `devices` (the first one speaks for all)."""
    device = devices[0]
    return Placement(
        platform=device.platform,
        mesh=mesh,
        batch_axes=tuple(batch_axes),
        compute_capability=getattr(device, "compute_capability", None),
    )


def for_mesh(mesh: Mesh, batch_axes: Sequence[str]) -> Placement:
    return of_devices(list(mesh.devices.flat), mesh, batch_axes)


_CURRENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
    "idfuse_jax_placement", default=None
)


def current() -> Placement:
    """The placement of the program being traced (see the module docstring)."""
    placement = _CURRENT.get()
    return placement if placement is not None else of_devices(jax.devices()[:1])


@contextlib.contextmanager
def on(mesh: Mesh, batch_axes: Sequence[str]) -> Iterator[Placement]:
    """Programs traced inside run over `mesh`; kernels may split their batch over `batch_axes`."""
    token = _CURRENT.set(for_mesh(mesh, batch_axes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def traced_on(fn: Callable[..., Any], mesh: Mesh, batch_axes: Sequence[str]) -> Callable[..., Any]:
    """`fn` that traces inside `on(mesh, batch_axes)`: jit this, not `fn`, and every trace of
    the program (lower, first call, retrace) sees the mesh's devices."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with on(mesh, batch_axes):
            return fn(*args, **kwargs)

    return wrapped
