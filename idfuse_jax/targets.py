"""Compile-only accelerators by name: TPU slices and GPU nodes the compilers can target from a
CPU-only machine, with the per-device figures a plan needs (memory, peak bfloat16 FLOP/s).

`devices("v5e-32")` gives the 32 devices of a v5e-32 slice, `devices("8xh100")` the 8 GPUs of an
H100 node; a program jitted over a mesh of them lowers and compiles with the real TPU or GPU
compiler (`.lower(...).compile()`), never runs. TPU targets need libtpu (`pip install
'idfuse_jax[accel]'`), GPU targets the CUDA 12 plugin (same extra) and `JAX_PLATFORMS=cpu` on a
machine without a GPU.

Targets (`TARGETS`): v5e-4, v5e-8, v5e-32 (TPU v5e, 16 GiB HBM a chip), v5p-8 (4 v5p chips, 95
GiB), v6e-4, v6e-8 (Trillium, 32 GiB); 1xh100, 8xh100 (H100 SXM 80 GB), 1xh200, 8xh200,
1xa100-40, 8xa100-40, 1xa100-80, 8xa100-80 (A100 SXM). A GPU target's device description is the
XLA target spec pinned in `idfuse_jax/gpu_specs/` (from openxla/xla; each file names its commit).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import re
from typing import Any

from jax.experimental import topologies

from idfuse_jax.errors import UserError

GIB = 2**30
# JAX's GPU allocator gets this share of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (with or without preallocation: it is the BFC allocator's limit).
GPU_DEFAULT_MEM_FRACTION = 0.75


class TargetError(UserError):
    """An unknown target name, or a target whose compiler is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One compile target: `num_devices` devices of one kind.

    `topology` is libtpu's topology name ("v5e:4x8") for TPU targets and the CUDA plugin's
    "slices x hosts x devices per host" ("1x1x8") for GPU ones; `spec` names the pinned
    GpuTargetConfigProto file of a GPU target. `memory_bytes` is one device's memory (HBM);
    `peak_flops` its dense bfloat16 matrix peak (vendor figures), for MFU.
    """

    name: str
    platform: str  # "tpu" or "gpu"
    num_devices: int
    topology: str
    memory_bytes: int
    peak_flops: float
    device_name: str
    spec: str = ""

    @property
    def usable_bytes(self) -> int:
        """The memory a JAX program may use on one device: all of a TPU's HBM (the TPU compiler
        itself refuses a program that does not fit); on a GPU the allocator's share,
        XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of it."""
        if self.platform == "tpu":
            return self.memory_bytes
        fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
        return int(self.memory_bytes * (float(fraction) if fraction else GPU_DEFAULT_MEM_FRACTION))

    def compiler_options(self) -> dict[str, Any]:
        """Options for `lowered.compile(...)` on this target. Without a device, XLA's GPU
        compiler cannot autotune, and its Triton GEMM tiling fails on small odd shapes
        ("Couldn't find output tile sizes"): compile GEMMs through cuBLAS instead."""
        return {"xla_gpu_enable_triton_gemm": False} if self.platform == "gpu" else {}

    def devices(self) -> list[Any]:
        """The target's compile-only devices (`devices(self.name)`)."""
        return devices(self.name)


def gpu_spec(name: str) -> str:
    """The text of a pinned GpuTargetConfigProto, `idfuse_jax/gpu_specs/<name>.txtpb`."""
    return (importlib.resources.files("idfuse_jax") / "gpu_specs" / f"{name}.txtpb").read_text()


def _spec_memory(name: str) -> int:
    """device_memory_size of a pinned GPU spec: one source for the GPU's memory."""
    match = re.search(r"^\s*device_memory_size:\s*(\d+)", gpu_spec(name), re.MULTILINE)
    if match is None:
        raise AssertionError(f"gpu_specs/{name}.txtpb has no device_memory_size")
    return int(match.group(1))


def _tpu(name: str, topology: str, chips: int, hbm_gib: int, tflops: float, kind: str) -> Target:
    return Target(name, "tpu", chips, topology, hbm_gib * GIB, tflops * 1e12, kind)


def _gpus(spec: str, label: str, tflops: float, device_name: str) -> list[Target]:
    memory = _spec_memory(spec)
    return [
        Target(f"{n}x{label}", "gpu", n, f"1x1x{n}", memory, tflops * 1e12, device_name, spec)
        for n in (1, 8)
    ]


# Peak dense bfloat16 FLOP/s per chip/GPU, from the vendors' spec sheets (Google Cloud TPU docs;
# NVIDIA's H100/H200/A100 SXM data sheets, without sparsity).
TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        _tpu("v5e-4", "v5e:2x2", 4, 16, 197, "TPU v5 lite"),
        _tpu("v5e-8", "v5e:2x4", 8, 16, 197, "TPU v5 lite"),
        _tpu("v5e-32", "v5e:4x8", 32, 16, 197, "TPU v5 lite"),
        _tpu("v5p-8", "v5p:2x2x1", 4, 95, 459, "TPU v5"),
        _tpu("v6e-4", "v6e:2x2", 4, 32, 918, "TPU v6 lite"),
        _tpu("v6e-8", "v6e:2x4", 8, 32, 918, "TPU v6 lite"),
        *_gpus("h100_sxm", "h100", 989, "NVIDIA H100 80GB HBM3"),
        *_gpus("h200", "h200", 989, "NVIDIA H200 141GB HBM3e"),
        *_gpus("a100_sxm_40", "a100-40", 312, "NVIDIA A100-SXM4-40GB"),
        *_gpus("a100_sxm_80", "a100-80", 312, "NVIDIA A100-SXM4-80GB"),
    ]
}


def get(name: str) -> Target:
    """The target called `name`; an unknown name is a `TargetError` listing the known ones."""
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]


@functools.cache
def devices(name: str) -> list[Any]:
    """The compile-only devices of target `name` (cached: one topology per process).

    A GPU target needs `JAX_PLATFORMS=cpu` (or a real GPU backend) set before JAX starts, and
    the CUDA plugin installed; a TPU target needs libtpu. Missing either is a `TargetError`.
    """
    target = get(name)
    # A compile-only TPU client never owns a chip: let it load libtpu next to another process.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if target.platform == "tpu":
            topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
        else:
            topology = topologies.get_topology_desc(
                platform="cuda",
                topology_name="",
                topology=target.topology,
                target_config=gpu_spec(target.spec),
            )
    except Exception as e:  # the plugins raise RuntimeErrors and ValueErrors of all kinds
        package = "libtpu" if target.platform == "tpu" else "the CUDA 12 plugin (jax[cuda12])"
        raise TargetError(
            f"target {name}: cannot create its compile-only devices ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it needs {package}: "
            "pip install 'idfuse_jax[accel]'"
        ) from e
    found = list(topology.devices)
    if len(found) != target.num_devices:
        raise AssertionError(f"target {name}: {len(found)} devices, expected {target.num_devices}")
    return found
