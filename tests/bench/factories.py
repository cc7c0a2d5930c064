"""Factories for synthetic benchmark results (no training: bench's own logic is tested on made-up measurements)."""

from __future__ import annotations

import random

from bench.config import BenchConfig
from bench.results import BenchResult, GpuInfo, Metrics, RankMemory, RepeatSample, RunEnvironment

GIB = 1 << 30

A100 = "NVIDIA A100-SXM4-80GB"


def gpu_env(name: str = A100, count: int = 8) -> RunEnvironment:
    """An environment that looks like a node with ``count`` GPUs called ``name``."""
    return RunEnvironment(
        python="3.11.9",
        platform="Linux-test",
        packages={"torch": "2.13.0", "phi3v-bench": "0.1.0"},
        git_sha="0" * 40,
        git_dirty=False,
        cuda_version="12.8",
        driver_version="570.1",
        gpus=[GpuInfo(i, name, "8.0", 80 * GIB) for i in range(count)],
        cpu="Test CPU",
        cpu_count=96,
        ram_bytes=900 * GIB,
    )


def make_result(
    cfg: BenchConfig | None = None,
    *,
    step_time: float = 0.5,
    jitter: float = 0.01,
    repeats: int = 3,
    steps: int = 10,
    allocated: int = 20 * GIB,
    reserved: int = 24 * GIB,
    seed: int = 0,
    env: RunEnvironment | None = None,
) -> BenchResult:
    """An ``ok`` result whose step times are ``step_time`` with relative Gaussian ``jitter``, on every rank."""
    cfg = cfg or BenchConfig(method="lora", gpus=8, global_batch=64, release="v-test")
    rng = random.Random(seed)
    samples = []
    for _ in range(repeats):
        times = [step_time * (1 + rng.gauss(0, jitter)) for _ in range(steps)]
        memory = [
            RankMemory(rank=r, device=f"cuda:{r % cfg.gpus}", gpu_allocated_bytes=allocated - r * 1000,
                       gpu_reserved_bytes=reserved - r * 1000, cpu_rss_bytes=8 * GIB)
            for r in range(cfg.world_size)
        ]
        samples.append(RepeatSample(step_times_s=times, warmup_times_s=[30.0, 5.0], memory=memory, final_loss=1.25))
    metrics = Metrics(
        repeats=samples,
        images_per_step=cfg.images_per_step,
        tokens_per_step=cfg.global_batch * 2443,
        image_tokens_per_step=cfg.global_batch * 2377,
        model_flops_per_step=cfg.global_batch * 8.1e13,
        peak_flops_per_gpu=312e12,
        total_params=4_150_000_000,
        trainable_params=100_000_000,
    )
    return BenchResult(cfg, env or gpu_env(count=cfg.gpus), "ok", metrics=metrics,
                       started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:10:00+00:00")
