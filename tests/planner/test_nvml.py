"""phi3v_core.nvml: CUDA_VISIBLE_DEVICES, MIG, permission errors, per-process memory (fake pynvml module)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from phi3v_core.nvml import parse_visible_devices, process_memory_bytes, visible_devices
from planner.hardware import detect

from .conftest import FakeDevice, FakeNVML, FakeNVMLError

GIB = 2**30


class NoPermission(FakeNVMLError):
    """Stands in for pynvml.NVMLError_NoPermission."""


class FullNVML(FakeNVML):
    """FakeNVML plus UUIDs, MIG, per-process memory and injectable permission errors."""

    def __init__(self, devices, mig=None, deny=(), processes=None, **kwargs):
        super().__init__(devices, **kwargs)
        self.mig = mig or {}  # physical index -> list of (uuid, name, memory bytes)
        self.deny = set(deny)  # method names that raise NoPermission
        self.processes = processes or {}  # physical index -> [(pid, bytes)]

    def __getattribute__(self, name):
        if name in object.__getattribute__(self, "deny"):

            def denied(*args, **kwargs):
                raise NoPermission("Insufficient Permissions")

            return denied
        return object.__getattribute__(self, name)

    def _index(self, handle):
        return next(i for i, d in enumerate(self.devices) if d is handle)  # FakeDevice compares by value

    def nvmlDeviceGetUUID(self, handle):
        if isinstance(handle, SimpleNamespace):
            return handle.uuid
        return f"GPU-{self._index(handle):02d}aa-bbbb"

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for device in self.devices:
            if self.nvmlDeviceGetUUID(device) == uuid:
                return device
        for slots in self.mig.values():
            for slot in slots:
                if slot[0] == uuid:
                    return uuid
        raise FakeNVMLError("Not Found")

    def nvmlDeviceGetMigMode(self, handle):
        index = self._index(handle)
        return (1, 1) if index in self.mig else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot):
        slots = self.mig[self._index(handle)]
        if slot >= len(slots):
            raise FakeNVMLError("Not Found")
        uuid, name, memory = slots[slot]
        return SimpleNamespace(uuid=uuid, name=name, memory_bytes=memory)

    def nvmlDeviceGetName(self, handle):
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=handle.memory_bytes)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        index = self._index(handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes.get(index, [])]


def _a100s(n=4):
    return [FakeDevice("NVIDIA A100-SXM4-80GB", 80 * GIB, (8, 0), nvlinks=12) for _ in range(n)]


def test_all_devices_without_cuda_visible_devices():
    report = visible_devices(FullNVML(_a100s()), environ={})
    assert [d.cuda_index for d in report.devices] == [0, 1, 2, 3]
    assert report.devices[2].uuid == "GPU-02aa-bbbb" and report.devices[0].nvlink_active == 12
    assert report.error is None and report.warnings == ()


@pytest.mark.parametrize(
    ("value", "physical"),
    [("2,0", [2, 0]), ("GPU-03aa", [3]), ("GPU-01aa-bbbb,3", [1, 3]), ("", []), ("1,7,2", [1]), ("0,0", [0])],
)
def test_cuda_visible_devices_subsets(value, physical):
    report = visible_devices(FullNVML(_a100s()), environ={"CUDA_VISIBLE_DEVICES": value})
    assert [d.nvml_index for d in report.devices] == physical
    assert [d.cuda_index for d in report.devices] == list(range(len(physical)))
    if value == "1,7,2":
        assert any("'7' matches no device" in w for w in report.warnings)


def test_mig_instances_replace_their_parent_and_can_be_selected():
    mig = {0: [("MIG-aaaa", "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40 * GIB), ("MIG-bbbb", "… MIG 1g.10gb", 10 * GIB)]}
    nvml = FullNVML(_a100s(2), mig=mig)
    report = visible_devices(nvml, environ={})
    assert [(d.mig, d.memory_total_bytes) for d in report.devices] == [
        (True, 40 * GIB),
        (True, 10 * GIB),
        (False, 80 * GIB),
    ]
    chosen = visible_devices(nvml, environ={"CUDA_VISIBLE_DEVICES": "MIG-bbbb"})
    assert [d.uuid for d in chosen.devices] == ["MIG-bbbb"] and chosen.devices[0].compute_capability == (8, 0)
    found = detect(nvml, environ={"CUDA_VISIBLE_DEVICES": "MIG-aaaa"})
    assert found.spec.memory_gib == 40 and any("MIG instance" in n for n in found.notes)


def test_a_permission_error_is_a_warning_not_a_failed_detection():
    nvml = FullNVML(_a100s(2), deny={"nvmlDeviceGetCudaComputeCapability", "nvmlDeviceGetUUID"})
    report = visible_devices(nvml, environ={})
    assert len(report.devices) == 2 and report.error is None
    assert report.devices[0].compute_capability is None and report.devices[0].uuid is None
    assert any("Insufficient Permissions" in w for w in report.warnings)
    found = detect(nvml, environ={})
    assert found.ok and found.count == 2


def test_no_driver_and_no_pynvml(monkeypatch):
    assert "Driver Not Loaded" in visible_devices(FullNVML(_a100s(), fail_init=True), environ={}).error
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError
    assert visible_devices(environ={}).error == "pynvml (nvidia-ml-py) is not installed"
    assert process_memory_bytes(0) is None


def test_fake_pynvml_module_is_used_by_default(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FullNVML(_a100s(1)))
    assert len(visible_devices(environ={}).devices) == 1
    assert detect(environ={}).spec.key == "A100-80GB"


def test_process_memory_follows_cuda_visible_devices():
    nvml = FullNVML(_a100s(4), processes={3: [(1234, 5 * GIB), (99, GIB)]})
    assert process_memory_bytes(1, pid=1234, nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "0,3"}) == 5 * GIB
    assert process_memory_bytes(0, pid=1234, nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "0,3"}) is None
    assert process_memory_bytes(5, pid=1234, nvml=nvml, environ={}) is None


def test_parse_visible_devices():
    assert parse_visible_devices(None) is None
    assert parse_visible_devices(" ") == []
    assert parse_visible_devices("0, GPU-ab") == ["0", "GPU-ab"]
