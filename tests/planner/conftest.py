"""Planner test helpers: a fake NVML module and an isolated trace cache."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class FakeDevice:
    """One GPU as NVML would describe it."""

    name: str
    memory_bytes: int
    cc: tuple[int, int]
    nvlinks: int = 0


class FakeNVML:
    """The subset of pynvml's API the planner calls, answering for ``devices``."""

    NVML_NVLINK_MAX_LINKS = 18

    def __init__(
        self, devices: list[FakeDevice], driver: str = "550.54.15", cuda: int = 12040, fail_init: bool = False
    ):
        self.devices = devices
        self.driver = driver
        self.cuda = cuda
        self.fail_init = fail_init
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return self.driver.encode()

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        return SimpleNamespace(total=handle.memory_bytes, used=0, free=handle.memory_bytes)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeDevice) -> tuple[int, int]:
        return handle.cc

    def nvmlDeviceGetNvLinkState(self, handle: FakeDevice, link: int) -> int:
        if link >= handle.nvlinks:
            raise FakeNVMLError("Not Supported")
        return 1


GIB = 2**30

#: What real drivers report (names as nvidia-smi prints them; memory as NVML's total).
MACHINES = {
    "volta": [FakeDevice("Tesla V100-SXM2-32GB", 32 * GIB, (7, 0), nvlinks=6)] * 8,
    "turing": [FakeDevice("Tesla T4", 15360 * 2**20, (7, 5))],
    "ampere": [FakeDevice("NVIDIA A100-SXM4-80GB", 80 * GIB, (8, 0), nvlinks=12)] * 8,
    "hopper": [FakeDevice("NVIDIA H100 80GB HBM3", 81559 * 2**20, (9, 0), nvlinks=18)] * 8,
}


@pytest.fixture
def fake_nvml():
    """Factory: ``fake_nvml("ampere")`` or ``fake_nvml([FakeDevice(...)])``."""

    def make(machine: str | list[FakeDevice], **kwargs) -> FakeNVML:
        devices = MACHINES[machine] if isinstance(machine, str) else machine
        return FakeNVML(list(devices), **kwargs)

    return make


@pytest.fixture(autouse=True)
def _trace_cache(tmp_path, monkeypatch):
    """Never write traces into the user's cache from tests."""
    monkeypatch.setenv("PHI3V_CACHE", str(tmp_path / "cache"))
