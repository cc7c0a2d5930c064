"""Failure statuses: every spelling of out-of-memory (GPU and host), signals, timeouts, and the printed run notes."""

from __future__ import annotations

import signal

import pytest

from bench.config import BenchConfig
from bench.results import BenchResult, Metrics, RankMemory, RepeatSample
from bench.status import RepeatOutcome, classify_repeat, looks_like_oom, oom_status, rank_failure, run_notes


@pytest.mark.parametrize(
    ("payload", "log", "expected"),
    [
        ({"rank": 0, "status": "oom", "message": "CUDA out of memory", "failed_at_step": 2}, "", "oom"),
        ({"rank": 0, "status": "error", "message": "RuntimeError: boom"}, "", "error"),
        ({"rank": 0, "status": "error", "message": "worker died"}, "torch.OutOfMemoryError: CUDA out of memory", "oom"),
        ({"rank": 0, "status": "error", "message": "RuntimeError: CUDA error: out of memory"}, "", "oom"),
        ({"rank": 0, "status": "error", "message": "RuntimeError: CUBLAS_STATUS_ALLOC_FAILED when calling"}, "", "oom"),
    ],
)
def test_failures_are_classified(payload: dict, log: str, expected: str) -> None:
    status, message, _ = rank_failure([payload, {"rank": 1, "status": "ok"}], log)
    assert status == expected and message


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
        ("RuntimeError: cuda OUT OF MEMORY. tried to allocate", "oom"),  # any case
        ("RuntimeError: CUDA error: out of memory", "oom"),
        ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error "
         "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\nLast error:\nCuda failure 2 'out of memory'",
         "oom"),
        ("RuntimeError: CUDA driver error: out of memory", "oom"),
        ("RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "oom"),
        ("RuntimeError: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "oom"),
        ("CUDA runtime error: cudaErrorMemoryAllocation", "oom"),
        ("RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
         "tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)", "host_oom"),
        ("RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate 1024 bytes.", "host_oom"),
        ("MemoryError", "host_oom"),
        ("Traceback ...\nMemoryError: Unable to allocate 8.00 GiB for an array", "host_oom"),
        ("[12345.678] Out of memory: Killed process 4242 (python) total-vm:99kB", "host_oom"),
        ("RuntimeError: shape mismatch", None),
        ("ValueError: memory_format is not supported", None),
    ],
)
def test_every_spelling_of_out_of_memory(text: str, status: str | None) -> None:
    assert oom_status(text) == status
    assert looks_like_oom(text) == (status is not None)
    payload = {"rank": 0, "status": "error", "message": text}
    assert rank_failure([payload], "")[0] == (status or "error")


def test_timeout_and_signals_are_classified() -> None:
    hung = RepeatOutcome(payloads=[], log="", timed_out=True, return_codes=[-9])
    assert classify_repeat(hung, 60)[0] == "timeout"
    # SIGKILL alone is not evidence of an OOM: the OOM killer, a scheduler and a user all send it.
    killed = RepeatOutcome(payloads=[], log="", timed_out=False, return_codes=[-signal.SIGKILL])
    status, message, _ = classify_repeat(killed, 60)
    assert status == "killed" and "SIGKILL" in message
    torchrun_log = "  exitcode  : -9 (pid: 123)\n  error_file: <N/A>\n  traceback : Signal 9 (SIGKILL) received by PID 123"
    via_torchrun = RepeatOutcome(payloads=[], log=torchrun_log, timed_out=False, return_codes=[1])
    status, message, _ = classify_repeat(via_torchrun, 60)
    assert status == "killed" and message.startswith("worker killed by SIGKILL with no out-of-memory message")
    terminated = RepeatOutcome(payloads=[], log="", timed_out=False, return_codes=[-signal.SIGTERM])
    message = classify_repeat(terminated, 60)[1]
    assert "SIGTERM" in message and "OOM killer" not in message  # the OOM killer sends SIGKILL only
    assert "OOM killer" in classify_repeat(killed, 60)[1]
    # With evidence it is an OOM: the kernel's OOM-killer line naming the worker, or the worker's own log.
    kernel = RepeatOutcome(payloads=[], log="", timed_out=False, return_codes=[-9],
                     kernel_log="[ 99.1] Out of memory: Killed process 123 (python) total-vm:1kB")
    status, message, _ = classify_repeat(kernel, 60)
    assert status == "host_oom" and "OOM killer" in message
    logged = RepeatOutcome(payloads=[], log="NCCL WARN Cuda failure 2 'out of memory'", timed_out=False, return_codes=[-6])
    assert classify_repeat(logged, 60)[0] == "oom"
    # torchrun stops the other ranks with SIGTERM after one failed: the failed rank's own error stands.
    rank_error = {"rank": 1, "status": "error", "message": "RuntimeError: boom"}
    stopped = RepeatOutcome(payloads=[{"rank": 0, "status": "ok"}, rank_error],
                      log="Signal 15 (SIGTERM) received by PID 77", timed_out=False, return_codes=[1])
    assert classify_repeat(stopped, 60) == ("error", "RuntimeError: boom", None)
    fine = RepeatOutcome(payloads=[{"rank": 0, "status": "ok"}], log="", timed_out=False, return_codes=[0])
    assert classify_repeat(fine, 60) is None


def test_run_notes_say_where_the_time_went_and_flag_skips_and_device_memory() -> None:
    memory = [RankMemory(rank=0, device="cuda:0", nvml_process_bytes=1, nvml_source="device_used")]
    repeats = [RepeatSample(step_times_s=[1.0, 1.0], warmup_times_s=[2.0], memory=memory, skipped_steps=2,
                            skipped_timed_steps=[2]),
               RepeatSample(step_times_s=[1.0, 1.0], warmup_times_s=[2.0], memory=memory, skipped_steps=0)]
    result = BenchResult(config=BenchConfig(release="t"), metrics=Metrics(repeats=repeats, images_per_step=2,
                                                                          wall_s=16.0))
    notes = run_notes(result)
    assert notes[0] == "run took 16.0 s; warm-up + timed steps 8.0 s (50%)"
    assert notes[1] == "the fp16 loss scaler skipped 2 steps (no weight update): repeat 1: timed steps [2]"
    assert "device's used memory" in notes[2]
    assert run_notes(BenchResult(config=BenchConfig(release="t"))) == []
