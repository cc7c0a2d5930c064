"""The real runner: `phi3v-bench run` end to end on CPU, a 2-process run, failure classification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import BenchConfig
from bench.runner import _failure, launch_commands, run_config
from bench.worker import plan_steps


def test_step_plan_puts_instrumented_steps_after_the_timed_window() -> None:
    cfg = BenchConfig(warmup=2, steps=3, release="t")
    assert plan_steps(cfg, cuda=False) == {"first_timed": 3, "last_timed": 5, "memory_step": 6, "total": 6}
    assert plan_steps(cfg, cuda=True) == {"first_timed": 3, "last_timed": 5, "memory_step": None, "total": 5}


def test_launch_uses_torchrun_per_node_with_loopback_rendezvous(tmp_path: Path) -> None:
    cfg = BenchConfig(gpus=2, nodes=2, global_batch=4, release="t")
    commands = launch_commands(cfg, tmp_path / "c.json", tmp_path)
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        assert "torch.distributed.run" in command
        assert f"--node_rank={rank}" in command and "--nnodes=2" in command and "--nproc_per_node=2" in command
        assert "--master_addr=127.0.0.1" in command
    single = launch_commands(BenchConfig(release="t"), tmp_path / "c.json", tmp_path)
    assert single[0][1:3] == ["-m", "bench.worker"]


@pytest.mark.parametrize(
    ("payload", "log", "expected"),
    [
        ({"rank": 0, "status": "oom", "message": "CUDA out of memory", "failed_at_step": 2}, "", "oom"),
        ({"rank": 0, "status": "error", "message": "RuntimeError: boom"}, "", "error"),
        ({"rank": 0, "status": "error", "message": "worker died"}, "torch.OutOfMemoryError: CUDA out of memory", "oom"),
    ],
)
def test_failures_are_classified(payload: dict, log: str, expected: str) -> None:
    status, message, _ = _failure([payload, {"rank": 1, "status": "ok"}], log)
    assert status == expected and message


def test_cli_run_lora_end_to_end_on_cpu(tmp_path: Path) -> None:
    """`phi3v-bench run --method lora` with a short protocol: real training, timing, memory and FLOPs."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--method", "lora", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--out", str(tmp_path), "--release", "test", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["status"] == "ok", doc.get("message")
    assert Path(doc["path"]).exists()
    rep = doc["metrics"]["repeats"][0]
    assert len(rep["step_times_s"]) == 2 and all(t > 0 for t in rep["step_times_s"])
    mem = rep["memory"][0]
    assert mem["cpu_rss_bytes"] > 100 * 2**20
    assert 0 < mem["cpu_tensor_peak_bytes"] < mem["cpu_rss_bytes"]
    metrics = doc["metrics"]
    assert metrics["images_per_step"] == 2  # tiny default: batch 2, one image per DocVQA-profile sample
    assert metrics["model_flops_per_step"] > 1e9
    assert 0 < metrics["trainable_params"] < metrics["total_params"]


@pytest.mark.slow
def test_two_process_run_reports_max_memory_over_ranks() -> None:
    cfg = BenchConfig(method="lora", model="tiny", precision="fp32", num_crops=1, global_batch=2, micro_batch=1, gpus=2,
                      steps=2, warmup=1, repeats=1, release="t")
    result = run_config(cfg, timeout_s=900)
    assert result.status == "ok", result.message
    memory = result.metrics.repeats[0].memory
    assert sorted(m.rank for m in memory) == [0, 1]
    assert result.summary.peak_cpu_rss_bytes == max(m.cpu_rss_bytes for m in memory)
    assert result.metrics.images_per_step == 2  # one per rank, summed
