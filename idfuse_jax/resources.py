"""Time and memory of a run's start-up phases (load, prepare, features, compile, steps).

Each phase logs one line: its wall time, the process's host memory now and at its peak so far
(resident set size), and the bytes of device memory in use. A user sees where start-up goes
and which phase sets the memory peak, e.g. on a host that holds the frozen weights only briefly
on their way to the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import time
from collections.abc import Iterator

import jax
from absl import logging

GIB = 2**30


def host_memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process; (0, peak) off Linux."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    now = 0
    with contextlib.suppress(OSError), open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * resource.getpagesize()
    return now, peak


def device_memory() -> int:
    """Bytes in use on this process's devices: the allocator's count where the backend keeps
    one (GPU, TPU), else the live arrays' shards (CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "bytes_in_use" in s for s in stats):
        return sum(s["bytes_in_use"] for s in stats)
    return sum(s.data.nbytes for a in jax.live_arrays() for s in a.addressable_shards)


@dataclasses.dataclass
class Phase:
    """What `phase` measured; `seconds` etc. are set when the phase ends."""

    name: str
    seconds: float = 0.0
    host_bytes: int = 0
    host_peak_bytes: int = 0
    device_bytes: int = 0


@contextlib.contextmanager
def phase(name: str) -> Iterator[Phase]:
    """Time a block and log its memory at the end (wait for its device work inside it)."""
    record = Phase(name)
    start = time.perf_counter()
    yield record
    record.seconds = time.perf_counter() - start
    record.host_bytes, record.host_peak_bytes = host_memory()
    record.device_bytes = device_memory()
    logging.info(
        "phase %s: %.1f s; host memory %.2f GiB (peak so far %.2f GiB); device memory %.2f GiB",
        name,
        record.seconds,
        record.host_bytes / GIB,
        record.host_peak_bytes / GIB,
        record.device_bytes / GIB,
    )
