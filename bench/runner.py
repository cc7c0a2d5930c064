"""Run one :class:`~bench.config.BenchConfig`: every repeat in fresh processes, aggregated into a ``BenchResult``.

One GPU (or CPU process) runs ``python -m bench.worker``; several GPUs run it under ``torchrun`` (on CPU, ``--gpus 2``
means two gloo processes); several nodes start one torchrun agent per node with a static rendezvous on 127.0.0.1, the
same way a real cluster launches. Ranks report separately and are combined honestly: memory is the **maximum over
ranks** (what must fit on each GPU), throughput comes from the **slowest rank's** step time (ranks wait for each
other at every step), and workload counts are **summed** over ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.results import BenchResult, Metrics, RankMemory, RepeatSample, capture_environment, utc_now

__all__ = ["launch_commands", "run_config"]

_OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_commands(cfg: BenchConfig, config_file: Path, out_dir: Path, python: str = sys.executable) -> list[list[str]]:
    """The command line(s) one repeat runs: one per node (a single command without torchrun for one process)."""
    worker = ["-m", "bench.worker", "--config", str(config_file), "--out", str(out_dir)]
    if cfg.world_size == 1:
        return [[python, *worker]]
    port = _free_port()
    commands = []
    for node_rank in range(cfg.nodes):
        commands.append(
            [
                python, "-m", "torch.distributed.run",
                f"--nnodes={cfg.nodes}",
                f"--node_rank={node_rank}",
                f"--nproc_per_node={cfg.gpus}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *worker,
            ]
        )
    return commands


def _run_repeat(cfg: BenchConfig, timeout_s: float | None) -> tuple[list[dict[str, Any]], str]:
    """Launch one repeat; return the rank payloads and the combined stderr tail."""
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-") as tmp:
        tmp_dir = Path(tmp)
        config_file = tmp_dir / "config.json"
        config_file.write_text(json.dumps(cfg.to_dict()))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.world_size)))
        env["PYTHONUNBUFFERED"] = "1"
        procs = []
        logs = []
        for i, command in enumerate(launch_commands(cfg, config_file, tmp_dir)):
            log = open(tmp_dir / f"node{i}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        try:
            for proc in procs:
                proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
        finally:
            for log in logs:
                log.close()
        payloads = [json.loads(p.read_text()) for p in sorted(tmp_dir.glob("rank*.json"))]
        tail = "\n".join((tmp_dir / f"node{i}.log").read_text()[-4000:] for i in range(len(procs)))
        if not payloads and any(proc.returncode for proc in procs):
            payloads = [{"rank": 0, "status": "error", "message": _last_error_line(tail)}]
        return payloads, tail


def _last_error_line(log: str) -> str:
    for line in reversed(log.strip().splitlines()):
        if "Error" in line or "error" in line:
            return line.strip()[:300]
    return "worker exited without a result (see the log)"


def _failure(payloads: list[dict[str, Any]], log: str) -> tuple[str, str, int | None] | None:
    bad = [p for p in payloads if p.get("status") != "ok"]
    if not bad:
        return None
    first = bad[0]
    status = first.get("status", "error")
    message = first.get("message", "")
    if status != "oom" and any(marker in message or marker in log for marker in _OOM_MARKERS):
        status = "oom"
    return status, message or _last_error_line(log), first.get("failed_at_step")


def run_config(cfg: BenchConfig, *, timeout_s: float | None = None) -> BenchResult:
    """Measure one configuration (``cfg.repeats`` fresh launches) and return the result; failures become rows.

    Args:
        cfg: A validated configuration.
        timeout_s: Kill a repeat that runs longer than this.
    """
    cfg.validate()
    started = utc_now()
    environment = capture_environment()
    metrics = Metrics()
    for _ in range(cfg.repeats):
        payloads, log = _run_repeat(cfg, timeout_s)
        failure = _failure(payloads, log)
        if failure is not None:
            status, message, step = failure
            result = BenchResult.failure(cfg, status, message, environment, failed_at_step=step, started_at=started)
            result.metrics = metrics  # keep the repeats that did finish
            return result
        ranks = sorted(payloads, key=lambda p: p["rank"])
        if len(ranks) != cfg.world_size:
            return BenchResult.failure(
                cfg, "error", f"{len(ranks)} of {cfg.world_size} ranks reported", environment, started_at=started
            )
        # Ranks synchronise every step, so the step took as long as its slowest rank.
        step_times = [max(times) for times in zip(*(p["step_times_s"] for p in ranks))]
        warmup = [max(times) for times in zip(*(p["warmup_times_s"] for p in ranks))]
        memory = [RankMemory(**p["memory"]) for p in ranks]
        metrics.repeats.append(
            RepeatSample(step_times_s=step_times, warmup_times_s=warmup, memory=memory, final_loss=ranks[0]["final_loss"])
        )
        metrics.images_per_step = sum(p["images_per_step"] or 0 for p in ranks)
        metrics.tokens_per_step = sum(p["tokens_per_step"] or 0 for p in ranks)
        metrics.image_tokens_per_step = sum(p["image_tokens_per_step"] or 0 for p in ranks)
        flops = [p.get("flops_per_step") for p in ranks]
        metrics.model_flops_per_step = float(sum(flops)) if all(f is not None for f in flops) else None
        hw_flops = [p.get("hardware_flops_per_step") for p in ranks]
        metrics.hardware_flops_per_step = float(sum(hw_flops)) if all(f is not None for f in hw_flops) else None
        metrics.peak_flops_per_gpu = ranks[0].get("peak_flops_per_gpu")
        metrics.total_params = ranks[0].get("total_params")
        metrics.trainable_params = ranks[0].get("trainable_params")
    return BenchResult(config=cfg, environment=environment, metrics=metrics, started_at=started, finished_at=utc_now())
