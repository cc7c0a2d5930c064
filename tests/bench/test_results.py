"""Result schema: JSON round trip, derived summary semantics, atomic storage, environment capture, pandas loader."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import pytest

from bench.config import BenchConfig
from bench.results import BenchResult
from bench.store import load_result, load_results, read_results, result_path, save_result
from phi3v_core.environment import RunEnvironment, capture_environment
from phi3v_core.errors import DataError
from phi3v_core.io import atomic_write_text
from tests.bench.factories import GIB, make_result


def test_round_trip_through_json_is_lossless(tmp_path) -> None:
    result = make_result(repeats=3, steps=7)
    path = save_result(result, tmp_path)
    loaded = load_result(path)
    assert loaded == result
    assert loaded.summary == result.summary
    data = json.loads(path.read_text())
    assert data["schema"] == "phi3v-bench/result" and data["schema_version"] == 1
    assert data["summary"]["img_per_s"] == pytest.approx(result.summary.img_per_s)


def test_failure_row_round_trip(tmp_path) -> None:
    cfg = BenchConfig(method="full", release="v-test")
    row = BenchResult.failure(cfg, "oom", "CUDA out of memory. Tried to allocate 2.00 GiB", RunEnvironment(python="3"),
                              failed_at_step=1)
    loaded = load_result(save_result(row, tmp_path))
    assert (loaded.status, loaded.failed_at_step, loaded.message) == ("oom", 1, row.message)
    assert loaded.summary.img_per_s is None and loaded.summary.timed_steps == 0


def test_non_finite_loss_is_stored_as_null(tmp_path) -> None:
    result = make_result(repeats=1)
    result.metrics.repeats[0].final_loss = math.nan
    loaded = load_result(save_result(result, tmp_path))  # json.dumps(allow_nan=False) would raise on NaN
    assert loaded.metrics.repeats[0].final_loss is None


def test_summary_is_global_max_over_ranks_and_excludes_warmup() -> None:
    cfg = BenchConfig(method="lora", gpus=4, nodes=2, global_batch=64, release="v-test")
    result = make_result(cfg, step_time=2.0, jitter=0.0, repeats=2, steps=5, allocated=10 * GIB)
    s = result.summary
    # Warmup steps of 30 s and 5 s are stored but must not move any statistic.
    assert s.step_time_median_s == pytest.approx(2.0)
    assert s.img_per_s == pytest.approx(64 / 2.0)  # global: all ranks' images
    assert s.img_per_s_per_gpu == pytest.approx(64 / 2.0 / 8)
    assert s.tokens_per_s == pytest.approx(64 * 2443 / 2.0)
    assert s.mfu == pytest.approx(64 * 8.1e13 / 2.0 / (8 * 312e12))
    assert s.timed_steps == 10 and s.repeats == 2
    # Rank 0 has the most memory (factory subtracts per rank): the peak is rank 0's, not the sum over 8 ranks.
    assert s.peak_gpu_allocated_bytes == 10 * GIB
    assert s.peak_cpu_rss_bytes == 8 * GIB


def test_percentiles_and_stdev() -> None:
    result = make_result(repeats=1, steps=10, jitter=0.0)
    result.metrics.repeats[0].step_times_s = [float(i) for i in range(1, 11)]
    s = result.summary
    assert s.step_time_median_s == 5.5
    assert s.step_time_p90_s == pytest.approx(9.1)  # numpy's linear interpolation
    assert s.step_time_stdev_s == pytest.approx(3.0276503540974917)


def test_storage_layout_and_permissions(tmp_path) -> None:
    result = make_result()
    path = save_result(result, tmp_path)
    assert path == result_path(tmp_path, "v-test", "8xA100-SXM4-80GB", result.config)
    assert path.name == f"{result.config.cell_id()}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", r"bad\.json:1: invalid JSON"),
        ('{"schema": "other"}', "not a phi3v-bench result"),
        ('{"schema": "phi3v-bench/result", "schema_version": 99}', "newer than"),
    ],
)
def test_invalid_files_raise_one_line_data_errors(tmp_path, text, match) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        load_result(path)


def test_inconsistent_ok_result_is_rejected(tmp_path) -> None:
    data = make_result().to_dict()
    data["metrics"]["repeats"] = []
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="status ok but no timed steps"):
        load_result(path)


def test_load_results_dataframe(tmp_path) -> None:
    save_result(make_result(BenchConfig(method="lora", gpus=8, global_batch=64, release="v1")), tmp_path)
    save_result(make_result(BenchConfig(method="full", gpus=8, global_batch=64, release="v1"), step_time=1.0), tmp_path)
    ref = tmp_path / "reference"
    ref.mkdir()
    (ref / "speed.json").write_text("{}")  # reference data is not a result and must be skipped
    df = load_results(tmp_path)
    assert len(df) == 2
    assert set(df.method) == {"lora", "full"}
    row = df.set_index("method").loc["full"]
    assert row.img_per_s == pytest.approx(64.0, rel=0.05)
    assert row.hardware == "8xA100-SXM4-80GB" and row.release == "v1" and row.torch_version == "2.13.0"
    assert row.peak_gpu_allocated_bytes == 20 * GIB


def test_capture_environment_on_this_machine() -> None:
    env = capture_environment()
    assert env.python and env.cpu and env.cpu_count
    assert env.packages["torch"] and env.packages["phi3v-bench"]
    import torch

    if not torch.cuda.is_available():
        assert env.hardware.startswith("cpu-") and env.hardware.endswith(f"-{env.cpu_count}t") and env.gpus == []
    else:
        assert env.gpus[0].compute_capability.count(".") == 1
        assert env.hardware.startswith(f"{torch.cuda.device_count()}x")


def test_hardware_slug() -> None:
    from tests.bench.factories import gpu_env

    assert gpu_env("NVIDIA H100 80GB HBM3", 1).hardware == "1xH100-80GB-HBM3"
    assert gpu_env("Tesla V100-SXM2-32GB", 8).hardware == "8xTesla-V100-SXM2-32GB"


@pytest.mark.parametrize(
    ("model", "threads", "expected"),
    [
        ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", 2, "cpu-Intel-Xeon-Platinum-8375C-2t"),
        ("AMD EPYC 7763 64-Core Processor", 128, "cpu-AMD-EPYC-7763-128t"),
        ("Apple M2 Pro", 12, "cpu-Apple-M2-Pro-12t"),
        ("", None, "cpu-unknown-0t"),
    ],
)
def test_cpu_machines_are_named_by_model_and_threads(model, threads, expected) -> None:
    assert RunEnvironment(cpu=model, cpu_count=threads).hardware == expected


def test_results_of_another_machine_or_commit_are_not_replaced(tmp_path) -> None:
    from bench.store import replacement_problem
    from tests.bench.factories import gpu_env

    ours = make_result(env=gpu_env(count=8))
    path = save_result(ours, tmp_path)
    assert replacement_problem(path, ours.environment) is None  # same machine, same commit: a re-run replaces
    other_commit = make_result(env=dataclasses.replace(gpu_env(count=8), git_sha="1" * 40))
    assert "commit" in replacement_problem(path, other_commit.environment)
    with pytest.raises(DataError, match="--force"):
        save_result(other_commit, tmp_path)
    assert load_result(path).environment.git_sha == "0" * 40  # untouched
    save_result(other_commit, tmp_path, force=True)
    assert load_result(path).environment.git_sha == "1" * 40
    # An error, killed or timeout row may always be retried (as matrix retries them); a host OOM is a finding.
    for status, replaceable in (("error", True), ("killed", True), ("timeout", True), ("host_oom", False)):
        failed = BenchResult.failure(ours.config, status, "boom", gpu_env(count=8))
        save_result(failed, tmp_path, force=True)
        assert (replacement_problem(path, other_commit.environment) is None) == replaceable, status


def test_shipped_cpu_results_still_load_and_compare() -> None:
    from bench.compare import compare_paths

    shipped = Path(__file__).resolve().parents[2] / "results" / "v0.1.0" / "cpu"
    pairs = read_results([shipped])
    assert pairs and all(r.status in ("ok", "oom", "error") for _, r in pairs)
    assert all(r.environment.hardware.startswith("cpu-") for _, r in pairs)  # named by model now, folder kept
    report = compare_paths([shipped], [shipped])
    assert len(report.matches) == len(pairs) and report.regressions == 0


class FakeNvml:
    """A stand-in for the pynvml module: four GPUs, the last one a different model."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.initialized = False
        self.names = ["NVIDIA H100 80GB HBM3"] * 3 + ["NVIDIA A10"]

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-{h}aaa-bbbb".encode()

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.names[h].encode()

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return (9, 0) if h < 3 else (8, 6)

    def nvmlDeviceGetMemoryInfo(self, h: int):
        return type("Mem", (), {"total": 80 * GIB if h < 3 else 24 * GIB})()

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.86.15"


@pytest.mark.parametrize(
    ("visible", "hardware", "first_cc"),
    [
        (None, "4xH100-80GB-HBM3", "9.0"),
        ("3,0", "2xA10", "8.6"),
        ("GPU-1aaa,GPU-2", "2xH100-80GB-HBM3", "9.0"),
        ("0,7,1", "1xH100-80GB-HBM3", "9.0"),  # CUDA ignores everything from the first invalid entry on
        ("", "cpu-", None),
    ],
)
def test_gpus_come_from_nvml_with_cuda_visible_devices(monkeypatch, visible, hardware, first_cc) -> None:
    import sys

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    env = capture_environment()
    assert env.hardware == hardware or (hardware == "cpu-" and env.hardware.startswith("cpu-"))
    assert env.driver_version == "570.86.15"
    assert (env.gpus[0].compute_capability if env.gpus else None) == first_cc
    assert [g.index for g in env.gpus] == list(range(len(env.gpus)))
    assert not fake.initialized  # NVML is shut down again


def test_shipped_results_without_the_new_fields_still_load() -> None:
    """Files written before wall time, fp16 skips and the NVML source existed read back with those fields unset."""
    shipped = sorted((Path(__file__).parents[2] / "results" / "v0.1.0").rglob("*.json"))
    assert shipped
    for path in shipped:
        assert "wall_s" not in path.read_text()
        result = load_result(path)
        assert result.metrics.wall_s is None and result.summary.wall_s is None
        assert all(r.wall_s is None and r.skipped_steps is None for r in result.metrics.repeats)
        assert all(m.nvml_source is None for r in result.metrics.repeats for m in r.memory)
        assert result.summary.steps_s > 0 and result.summary.skipped_steps is None


def test_new_fields_round_trip(tmp_path) -> None:
    result = make_result(repeats=2, steps=3)
    result.metrics.wall_s = 42.0
    result.metrics.repeats[0].wall_s = 20.0
    result.metrics.repeats[0].skipped_steps = 3
    result.metrics.repeats[0].skipped_timed_steps = [1]
    result.metrics.repeats[0].memory[0].nvml_source = "device_used"
    loaded = load_result(save_result(result, tmp_path))
    assert loaded == result
    assert loaded.summary.wall_s == 42.0 and loaded.summary.skipped_steps == 3
