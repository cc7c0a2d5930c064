"""ProcessMemoryReader: NVML initialised once, one query per sample, a labelled fallback where no PID matches."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from phi3v_core.nvml import DEVICE_USED, PROCESS, ProcessMemoryReader, process_memory_bytes

GIB = 1 << 30


class CountingNVML:
    """A pynvml stand-in with ``gpus`` devices that counts every call (``calls[name]``)."""

    def __init__(self, gpus: int, processes: dict[int, list[tuple[int, int]]], used: int = 7 * GIB) -> None:
        self.gpus = gpus
        self.processes = processes  # physical index -> [(pid, bytes)]
        self.used = used
        self.calls: Counter[str] = Counter()

    def __getattribute__(self, name: str):  # noqa: ANN204
        if name.startswith("nvml"):
            object.__getattribute__(self, "calls")[name] += 1
        return object.__getattribute__(self, name)

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.1"

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return int(uuid.split("-")[1])

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle}-uuid"

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * GIB, used=self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in self.processes.get(handle, [])]


def test_reads_cost_one_query_each_and_nvml_is_initialised_once() -> None:
    nvml = CountingNVML(8, {3: [(1234, 5 * GIB), (99, GIB)]})
    reader = ProcessMemoryReader(1, pid=1234, nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "0,3"})
    setup = Counter(nvml.calls)
    assert setup["nvmlInit"] == 1 and setup["nvmlShutdown"] == 0  # stays open for the sampling loop
    values = [reader.read() for _ in range(100)]
    assert values == [5 * GIB] * 100 and reader.source == PROCESS
    during = nvml.calls - setup
    assert during == Counter({"nvmlDeviceGetComputeRunningProcesses": 100})  # nothing else, however many GPUs
    reader.close()
    reader.close()
    assert nvml.calls["nvmlShutdown"] == 1 and nvml.calls["nvmlInit"] == 1


def test_no_matching_pid_falls_back_to_device_used_memory_labelled_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A container without the host PID namespace: NVML lists the host PID of this process, which never matches.
    nvml = CountingNVML(2, {0: [(987654, 5 * GIB)]}, used=6 * GIB)
    reader = ProcessMemoryReader(0, pid=42, nvml=nvml, environ={})
    setup = Counter(nvml.calls)
    with caplog.at_level(logging.WARNING, logger="phi3v_core.nvml"):
        values = [reader.read() for _ in range(10)]
    assert values == [6 * GIB] * 10
    assert reader.source == DEVICE_USED and "no process with PID 42" in reader.warning
    assert sum("no process with PID 42" in r.getMessage() for r in caplog.records) == 1
    during = nvml.calls - setup
    # The first read looks for the PID once; from then on each sample is the one device query.
    assert during == Counter({"nvmlDeviceGetComputeRunningProcesses": 1, "nvmlDeviceGetMemoryInfo": 10})


def test_one_shot_process_memory_does_not_fall_back() -> None:
    nvml = CountingNVML(2, {0: [(987654, 5 * GIB)]})
    assert process_memory_bytes(0, pid=42, nvml=nvml, environ={}) is None
    assert process_memory_bytes(0, pid=987654, nvml=nvml, environ={}) == 5 * GIB
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 2


def test_bench_reader_is_built_once_per_process_and_labels_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.measure as measure

    nvml = CountingNVML(8, {0: [(999999, GIB)]}, used=3 * GIB)  # no PID matches: device memory
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(measure, "_NVML_READERS", {})
    device = torch.device("cuda", 0)
    first = measure.nvml_process_reader(device)
    second = measure.nvml_process_reader(device)
    assert nvml.calls["nvmlInit"] == 1 and nvml.calls["nvmlDeviceGetCount"] == 1  # one set-up for both windows
    assert first.read() == second.read() == 3 * GIB
    probe = measure.InstrumentedSteps(first_timed_step=1, last_timed_step=1, nvml_reader=lambda d: first)
    cpu = torch.device("cpu")  # the window's CUDA calls are skipped; the NVML reader is what is tested
    probe._open_window(cpu)
    probe._close_window(cpu, 1)
    assert probe.nvml_peak_bytes == 3 * GIB and probe.nvml_source == DEVICE_USED
    assert any("no process with PID" in note for note in probe.notes)
    measure._close_nvml_readers()
    assert nvml.calls["nvmlShutdown"] == 1
