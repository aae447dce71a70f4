"""Test setup: 8 fake CPU devices, cheap compiles, a persistent compilation cache, and the shared
data folder.

The environment must be set before jax is first imported, hence at the top of conftest.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# LLVM's -O0 for the tests' programs: a cold CPU compile of the smoke run costs 40 % less CPU
# (the run: 39 s instead of 53), its steps 25 % more; the tests' programs are mostly compiled,
# not run. Subprocesses inherit it (test_train._env).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Compiles are slow on 2 cores; a persistent cache makes reruns and repeated shapes cheap.
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED = REPO.parent / "shared"
DREAMBOOTH = SHARED / "data" / "dreambooth"


@pytest.fixture(scope="session")
def dreambooth_dir() -> pathlib.Path:
    if not DREAMBOOTH.is_dir():
        pytest.fail(f"shared DreamBooth data not found at {DREAMBOOTH}")
    return DREAMBOOTH


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 for the session (tests/gcs_emulator.py), stopped at the end."""
    import gcs_emulator

    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        pytest.fail("gcp-storage-emulator is not installed (pip install -e '.[test]')")
    emulator = gcs_emulator.start(tmp_path_factory.mktemp("gcs") / "emulator.log")
    yield emulator
    emulator.stop()
