"""The measurement protocol: event order of a real repeat, the NVML sampler, kernel-independent FLOPs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from bench.config import BenchConfig
from bench.flop_count import step_micro_batches, trace_step_flops
from bench.measure import InstrumentedSteps, PeakSampler
from bench.worker import processor_for, run_rank, to_train_config
from phi3v_core.training.workload import build_workload
from tests.safety_helpers import HANG_GUARD_S


def test_a_real_repeat_reads_its_peaks_before_any_instrumented_work(tmp_path: Path) -> None:
    # The real worker code path on CPU: Trainer, StepTimer, InstrumentedSteps, memory probe, FLOP trace.
    cfg = BenchConfig(method="lora", model="tiny", precision="fp32", num_crops=1, global_batch=2, micro_batch=2,
                      steps=2, warmup=1, repeats=1, release="t")
    payload = run_rank(cfg, tmp_path)
    assert payload["status"] == "ok", payload.get("message")
    events = [tuple(e) for e in payload["events"]]
    names = [name for name, _ in events]
    opened, read = names.index("window_open"), names.index("peaks_read")
    assert events[opened][1] == 2 and events[read][1] == 3  # first and last timed step
    timed_ends = [i for i, (name, step) in enumerate(events) if name == "step_end" and step in (2, 3)]
    assert opened < min(timed_ends) and max(timed_ends) < read
    instrumented = [i for i, (name, _) in enumerate(events) if name.startswith(("memory_probe", "flop_trace"))]
    assert {"memory_probe_start", "flop_trace_start", "flop_trace_end"} <= set(names)
    assert min(instrumented) > read  # nothing instrumented before the peaks were read
    assert payload["flops_per_step"] > 0 and payload["hardware_flops_per_step"] > payload["flops_per_step"]
    assert payload["memory"]["cpu_tensor_peak_bytes"] > 0


def test_instrumented_steps_refuse_a_memory_probe_inside_the_timed_window() -> None:
    with pytest.raises(ValueError, match="after the timed window"):
        InstrumentedSteps(first_timed_step=2, last_timed_step=4, memory_step=3)


def test_peak_sampler_keeps_the_maximum_seen_during_the_window() -> None:
    readings = iter([100, 300, 250, None, 200] + [150] * 10_000)
    seen = threading.Event()
    count = 0

    def fake_nvml() -> int | None:
        nonlocal count
        count += 1
        if count >= 6:
            seen.set()
        return next(readings)

    sampler = PeakSampler(fake_nvml, period_s=0.001)
    sampler.start()
    assert seen.wait(timeout=HANG_GUARD_S)
    peak = sampler.stop()
    assert peak == 300
    assert sampler.samples >= 5  # the None reading is skipped


def test_peak_sampler_period_is_at_most_100ms() -> None:
    with pytest.raises(ValueError):
        PeakSampler(lambda: 1, period_s=0.5)


def test_window_uses_the_nvml_reader_and_closes_it() -> None:
    closed = []
    # the first reading (taken when the window opens) is the highest, every later one lower: the stored value is the
    # maximum only if it equals the first reading; the last reading would give 1000
    values = iter([9, *([1] * 100_000)])
    probe = InstrumentedSteps(
        first_timed_step=1, last_timed_step=1,
        nvml_reader=lambda device: ((lambda: next(values) * 1000), (lambda: closed.append(True))),
    )
    device = torch.device("cpu")
    probe._open_window(device)
    probe._close_window(device, 1)
    assert probe.nvml_peak_bytes == 9000
    assert probe.nvml_samples >= 2  # start + stop samples at least
    assert closed == [True]
    assert [name for name, _ in probe.events] == ["window_open", "peaks_read"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_flops_agree_across_attention_kernels(method: str) -> None:
    counts = {}
    for attn in ("eager", "sdpa", "flash_attention_2"):
        cfg = BenchConfig(method=method, attn=attn, precision="bf16", model="tiny", num_crops=1, global_batch=2,
                          micro_batch=1, release="t")
        train_cfg = to_train_config(cfg, "unused", 1)
        workload = build_workload(cfg, processor_for(cfg), 4)
        batches = step_micro_batches(train_cfg, workload.dataset, cfg.micro_batch, cfg.grad_accum)
        counts[attn] = trace_step_flops(train_cfg, batches)
    eager = counts["eager"].model_flops
    for attn, flops in counts.items():
        assert abs(flops.model_flops - eager) / eager < 0.01, (attn, flops, eager)
        assert flops.hardware_flops > flops.model_flops  # checkpointing recomputes the forward
    assert counts["flash_attention_2"].traced_attn == "sdpa"


def test_flops_include_attention_and_scale_with_sequence() -> None:
    # Attention is quadratic in the sequence: twice the crops must add more than twice the attention-free part would.
    small = BenchConfig(method="full", attn="sdpa", model="tiny", num_crops=1, global_batch=1, micro_batch=1, release="t")
    counts = []
    for cfg in (small, small.replace(num_crops=4)):
        train_cfg = to_train_config(cfg, "unused", 1)
        workload = build_workload(cfg, processor_for(cfg), 1)
        batches = step_micro_batches(train_cfg, workload.dataset, 1, 1)
        counts.append(trace_step_flops(train_cfg, batches).model_flops)
    assert counts[1] > counts[0] > 0


@pytest.mark.gpu(seconds=15)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_repeat_reads_window_peaks_and_samples_nvml(tmp_path: Path) -> None:
    """One tiny LoRA repeat on the GPU: allocator peaks read when the window closes, FLOPs and the GPU's peak.

    bf16 on compute capability >= 8.0 (H100, A100), fp16 on a V100 (no native bf16; TrainConfig refuses bf16
    there). The tiny model needs a few MiB; the GPU table knows all three cards' peaks (MFU).
    """
    precision = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    cfg = BenchConfig(method="lora", model="tiny", precision=precision, num_crops=1, global_batch=2, micro_batch=2,
                      steps=3, warmup=1, repeats=1, release="t")
    payload = run_rank(cfg, tmp_path)
    assert payload["status"] == "ok", payload.get("message")
    names = [name for name, _ in payload["events"]]
    assert "memory_probe_start" not in names  # CUDA has allocator peaks; no CPU probe step
    assert names.index("peaks_read") < names.index("flop_trace_start")
    memory = payload["memory"]
    assert memory["gpu_allocated_bytes"] > 0 and memory["gpu_reserved_bytes"] >= memory["gpu_allocated_bytes"]
    assert payload["flops_per_step"] > 0 and payload["peak_flops_per_gpu"]
    assert payload["attention_flops_per_step"] > 0  # the 6N / 4N+6Nt conventions' attention term
    # NVML's total-energy counter over the window (Volta and newer, not MIG): joules drawn, or None where missing
    from phi3v_core.nvml import ProcessMemoryReader

    reader = ProcessMemoryReader(0)
    counter = reader.total_energy_mj()
    reader.close()
    assert (memory["energy_j"] is None) == (counter is None)
    assert memory["energy_j"] is None or memory["energy_j"] > 0


@pytest.mark.gpu(seconds=2)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvml_reader_sees_this_process() -> None:
    """NVML's per-process memory covers a 256 MiB tensor (any card; skipped where NVML hides per-process use)."""
    from bench.measure import nvml_process_reader

    device = torch.device("cuda", 0)
    keep = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # make sure the process holds memory
    opened = nvml_process_reader(device)
    if opened is None:
        pytest.skip("NVML is not readable here (driver or container hides per-process numbers)")
    try:
        value = opened.read()
    finally:
        opened.close()
    # This process's memory, or in a container without per-process numbers the device's (labelled so).
    assert value is not None and value >= keep.numel()
    assert opened.source() in ("process", "device_used")


def test_flops_are_traced_once_across_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--flops trace``: two repeats of one configuration (the runner gives them one cache folder): the counter runs
    once, and its numbers are the analytic count's (the default, which traces nothing)."""
    import bench.flop_count as flop_count
    from bench.runner import FLOP_CACHE_ENV

    traced = []
    real = flop_count.trace_step_flops

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        traced.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flop_count, "trace_step_flops", counting)
    monkeypatch.setenv(FLOP_CACHE_ENV, str(tmp_path / "flops"))
    cfg = BenchConfig(method="lora", model="tiny", precision="fp32", num_crops=1, global_batch=2, micro_batch=1,
                      steps=1, warmup=1, repeats=2, release="t", flops="trace")
    payloads = []
    for repeat in range(cfg.repeats):
        (tmp_path / str(repeat)).mkdir()
        payloads.append(run_rank(cfg, tmp_path / str(repeat)))
    assert [p["status"] for p in payloads] == ["ok", "ok"]
    assert len(traced) == 1
    assert [p["flops_cached"] for p in payloads] == [False, True]
    assert payloads[0]["flops_per_step"] == payloads[1]["flops_per_step"] > 0
    assert payloads[0]["hardware_flops_per_step"] == payloads[1]["hardware_flops_per_step"]
    assert [p["flops_source"] for p in payloads] == ["trace", "trace"]
    analytic = run_rank(cfg.replace(flops="analytic", repeats=1), tmp_path / "0")
    assert len(traced) == 1 and analytic["flops_source"] == "analytic" and analytic["flops_cached"] is False
    assert analytic["flops_per_step"] == pytest.approx(payloads[0]["flops_per_step"], rel=0.01)
    assert analytic["hardware_flops_per_step"] == pytest.approx(payloads[0]["hardware_flops_per_step"], rel=0.01)
    # The window (sync, peak reset, first NVML sample) opened before the first timed step's clock started.
    assert all(p["window_before_clock"] for p in payloads)


def test_flop_cache_key_changes_with_everything_the_count_depends_on() -> None:
    from bench.flop_count import flop_cache_key

    def key(seq: int = 32, batch: int = 1, accum: int = 1, **cfg_overrides: object) -> str:
        cfg = BenchConfig(**{"method": "lora", "model": "tiny", "precision": "fp32", "release": "t", **cfg_overrides})
        micro = [{"input_ids": torch.zeros(batch, seq, dtype=torch.long)} for _ in range(accum)]
        return flop_cache_key(to_train_config(cfg, "unused", 1), micro)

    base = key()
    assert key() == base  # stable
    assert key(precision="bf16") == base  # traced in fp32 whatever the run's precision
    assert key(attn="flash_attention_2") == key(attn="sdpa")  # fused kernels are traced as SDPA math
    changed = [key(seq=64), key(batch=2), key(accum=2), key(method="full"), key(gradient_checkpointing=False),
               key(model="phi-3.5-vision"), key(attn="eager")]
    assert len({base, *changed}) == 1 + len(changed)


def test_flop_cache_round_trips_and_ignores_a_torn_entry(tmp_path: Path) -> None:
    from bench.flop_count import FlopCache, StepFlops

    cache = FlopCache(tmp_path / "flops")
    assert cache.get("k") is None
    flops = StepFlops(model_flops=10, hardware_flops=13, traced_attn="sdpa", traced_shapes=1)
    cache.put("k", flops)
    assert cache.get("k") == flops
    (tmp_path / "flops" / "k.json").write_text("{\"model_flops\": 1")
    assert cache.get("k") is None
