"""Advice from the run itself: after ``phi3v-bench run`` on a GPU, one line when the run left memory unused or ran a
slower layout than the planner's best for this card and method.

The planner's layout search (:func:`planner.recommend.plan`, the same request as ``--layout plan``,
:func:`bench.layout.plan_request`) ranks every layout of the run's method on the detected card; the line compares the
run's layout with the recommended one by predicted throughput, beside the measured peak against the card, and ends
with the command that measures the faster one::

    peak 45.0 of 80.0 GiB; micro-batch 2 × 4, checkpointing off is predicted 1.4× faster: phi3v-bench run ...

Nothing is said on a CPU (the planner plans GPUs), for a failed run, or when the run's layout is the planner's best
and used at least :data:`UNUSED_SHARE` of the card. ``phi3v-finetune`` lives in ``phi3v_core``, which may not import
the planner (tests/test_architecture.py), so its advice names ``phi3v-plan`` instead of computing a layout.
"""

from __future__ import annotations

import shlex
from typing import Any

from bench.config import BenchConfig
from bench.layout import layout_label, run_flag

__all__ = ["UNUSED_SHARE", "after_run_advice", "command_for", "run_advice"]

GIB = 1 << 30
#: A run whose measured peak stays under this share of the card "left memory unused".
UNUSED_SHARE = 0.6
#: A layout predicted less than this much faster is not worth a line (the speed model's own error is larger).
MIN_SPEEDUP = 1.1


def _same(layout: Any, cfg: BenchConfig) -> bool:
    return (layout.micro_batch, layout.gradient_checkpointing, layout.optim, layout.offload) == (
        cfg.micro_batch, cfg.gradient_checkpointing, cfg.optim, cfg.offload)


def command_for(cfg: BenchConfig, layout: Any) -> str:
    """``phi3v-bench run`` with ``cfg``'s workload and ``layout``'s fields, every flag explicit."""
    flags = [*run_flag("method", cfg.method), *run_flag("model", cfg.model), *run_flag("num_crops", cfg.num_crops),
             "--seq-profile", cfg.seq_profile, *run_flag("global_batch", cfg.global_batch), *run_flag("gpus", cfg.gpus)]
    for field in ("micro_batch", "gradient_checkpointing", "optim", "offload"):
        flags += run_flag(field, getattr(layout, field))
    return "phi3v-bench run " + shlex.join(flags)


def run_advice(cfg: BenchConfig, peak_bytes: float | None, capacity_bytes: float | None,
               plan_method: Any | None = None) -> str | None:
    """The advice line for a finished GPU run (None when there is nothing to say).

    Args:
        cfg: The run's configuration.
        peak_bytes: Its measured peak per GPU (reserved, or NVML's).
        capacity_bytes: The card's memory.
        plan_method: The planner's :class:`~planner.request.MethodPlan` for this method on this card (computed when
            omitted).
    """
    if not peak_bytes or not capacity_bytes:
        return None
    if plan_method is None:
        from bench.layout import plan_request
        from planner.recommend import plan

        plan_method = plan(plan_request(cfg.to_dict())).method(cfg.method)
    peak = f"peak {peak_bytes / GIB:.1f} of {capacity_bytes / GIB:.1f} GiB"
    best = next((lay for lay in plan_method.layouts if lay.chosen), None)
    ran = next((lay for lay in plan_method.layouts if _same(lay, cfg)), None)
    if best is not None and not _same(best, cfg):
        if ran is not None and ran.samples_per_s and best.samples_per_s:
            speedup = best.samples_per_s / ran.samples_per_s
            if speedup >= MIN_SPEEDUP:
                label = layout_label({**cfg.to_dict(), **best.to_dict(), "layout": None})
                return f"{peak}; {label} is predicted {speedup:.1f}× faster: {command_for(cfg, best)}"
    if peak_bytes < UNUSED_SHARE * capacity_bytes:
        if best is not None and not _same(best, cfg):
            label = layout_label({**cfg.to_dict(), **best.to_dict(), "layout": None})
            return f"{peak}; phi3v-plan's layout for this card is {label}: {command_for(cfg, best)}"
        return f"{peak}; no faster layout of {cfg.method} is predicted to fit this card (phi3v-plan's choice)"
    return None


def after_run_advice(cfg: BenchConfig, result: Any, env: Any) -> list[str]:
    """:func:`run_advice` for a finished ``phi3v-bench run`` result on ``env``'s GPUs (empty on a CPU or a failure);
    a planner that cannot plan this card gives no advice rather than an error after the measurement."""
    if result.status != "ok" or not env.gpus or cfg.model == "tiny":
        return []
    s = result.summary
    peak = s.peak_gpu_reserved_bytes or s.peak_nvml_process_bytes
    try:
        line = run_advice(cfg, peak, float(min(g.total_memory_bytes for g in env.gpus)))
    except Exception:  # noqa: BLE001 - advice is optional; the measurement stands without it
        return []
    return [f"advice: {line}"] if line else []
