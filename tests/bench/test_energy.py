"""Energy per trained sample: NVML's total-energy counter over the timed window, per GPU, stored as J/sample and
Wh per epoch; "not available" where the counter is missing (fake NVML, no GPU needed)."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from bench.measure import InstrumentedSteps, NvmlReader
from bench.results import BenchResult
from bench.run_view import print_summary
from phi3v_core.nvml import ProcessMemoryReader
from tests.bench.factories import make_result
from tests.core.test_nvml_reader import CountingNVML


class EnergyNVML(CountingNVML):
    """The counting fake plus a total-energy counter (mJ) that advances ``step_mj`` per read, per device."""

    def __init__(self, *args, step_mj: int = 250_000, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_mj = step_mj
        self.counters: dict[int, int] = {}

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        self.counters[handle] = self.counters.get(handle, 10**9) + self.step_mj
        return self.counters[handle]


class NoEnergyNVML(CountingNVML):
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # e.g. a MIG instance, pre-Volta cards


def test_reader_reads_the_device_counter_of_the_visible_gpu() -> None:
    nvml = EnergyNVML(4, {}, step_mj=1000)
    reader = ProcessMemoryReader(1, pid=1, nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert reader.total_energy_mj() == 10**9 + 1000
    assert set(nvml.counters) == {3}  # CUDA device 1 is physical GPU 3
    assert ProcessMemoryReader(0, pid=1, nvml=NoEnergyNVML(1, {}), environ={}).total_energy_mj() is None
    assert ProcessMemoryReader(0, pid=1, nvml=CountingNVML(1, {}), environ={}).total_energy_mj() is None  # old pynvml


@pytest.mark.parametrize(("nvml", "expected"), [(EnergyNVML(1, {}, step_mj=250_000), 250.0), (NoEnergyNVML(1, {}), None)])
def test_the_window_stores_the_counter_difference_in_joules(nvml, expected) -> None:
    reader = ProcessMemoryReader(0, pid=1, nvml=nvml, environ={})
    probe = InstrumentedSteps(
        first_timed_step=1, last_timed_step=1,
        nvml_reader=lambda device: NvmlReader(read=reader.read, close=lambda: None, energy_mj=reader.total_energy_mj),
    )
    device = torch.device("cpu")
    probe._open_window(device)
    probe._close_window(device, 1)
    assert probe.energy_j == expected  # one read at the start, one at the end: 250 J between them


def _with_energy(joules_per_rank: float | None) -> BenchResult:
    result = make_result()  # 8 GPUs, global batch 64, 10 timed steps × 3 repeats, DocVQA profile
    for rep in result.metrics.repeats:
        rep.step_samples = [64] * len(rep.step_times_s)
        for m in rep.memory:
            m.energy_j = joules_per_rank
    return result


def test_summary_has_joules_per_sample_and_watt_hours_per_epoch() -> None:
    s = _with_energy(400.0).summary
    # 8 GPUs × 400 J over 10 steps × 64 samples
    assert s.energy_j_per_sample == pytest.approx(8 * 400 / 640)
    assert s.epoch_samples == 10189  # the DocVQA training set phi3v-plan plans with
    assert s.energy_wh_per_epoch == pytest.approx(8 * 400 / 640 * 10189 / 3600)
    stored = BenchResult.from_dict(_with_energy(400.0).to_dict())
    assert stored.metrics.repeats[0].memory[0].energy_j == 400.0
    out = io.StringIO()
    print_summary(Console(file=out, width=80), stored.config, stored)
    assert "energy J/sample (all GPUs)" in out.getvalue() and "5.00" in out.getvalue()
    assert "Wh per epoch (10189 samples)" in out.getvalue()


def test_a_missing_counter_is_not_available_not_zero() -> None:
    s = _with_energy(None).summary
    assert s.energy_j_per_sample is None and s.energy_wh_per_epoch is None
    assert s.energy_note == "not available: NVML's total-energy counter was not read"
    out = io.StringIO()
    print_summary(Console(file=out, width=80), make_result().config, _with_energy(None))
    assert "not available" in out.getvalue()
    # one rank without a reading: the sum over GPUs would be short, so nothing is claimed
    partial = _with_energy(400.0)
    partial.metrics.repeats[0].memory[3].energy_j = None
    partial.metrics.repeats[1].memory[3].energy_j = None
    partial.metrics.repeats[2].memory[3].energy_j = None
    assert partial.summary.energy_j_per_sample is None
