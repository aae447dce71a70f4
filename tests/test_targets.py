"""The compile-only targets: each gives its devices, of the kind and number it names, and a GPU
target's memory is the pinned spec's."""

import pytest

from idfuse_jax import targets


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_target_devices(name):
    target = targets.get(name)
    devices = target.devices()
    assert len(devices) == target.num_devices
    assert {d.device_kind for d in devices} == {target.device_name}
    assert {d.platform for d in devices} == {target.platform}


def test_gpu_memory_from_spec_and_allocator_share(monkeypatch):
    h100 = targets.get("8xh100")
    assert h100.memory_bytes == 84942979072  # device_memory_size of gpu_specs/h100_sxm.txtpb
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert h100.usable_bytes == int(0.75 * h100.memory_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert h100.usable_bytes == int(0.9 * h100.memory_bytes)
    assert targets.get("v5e-32").usable_bytes == 16 * 2**30


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(targets.TargetError, match=r"unknown target 'v9-8'; known targets: v5e-4, "):
        targets.get("v9-8")
