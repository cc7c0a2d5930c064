"""Advice from a finished ``phi3v-finetune`` run (issue #26 §2): one line when the run left the card's memory unused.

``phi3v_core`` may not import the planner (tests/test_architecture.py), so unlike ``phi3v-bench run``
(:mod:`bench.advice`, which runs the planner's layout search and names the faster layout with its predicted
speed-up) the line states the measured peak against the card and the ``phi3v-plan`` command that ranks the layouts
for this card, method and data. Said only where the peak stayed under :data:`UNUSED_SHARE` of the card.
"""

from __future__ import annotations

import shlex
from typing import Any

__all__ = ["UNUSED_SHARE", "cuda_peak_and_capacity", "memory_advice"]

GIB = 1 << 30
#: A run whose peak stays under this share of the card "left memory unused" (the same rule as bench.advice).
UNUSED_SHARE = 0.6
#: Tasks ``phi3v-plan --task`` knows; other data is planned from its folder (``--data``).
_PLANNED_TASKS = ("docvqa", "nlvr2", "hateful_memes", "ucf101")


def memory_advice(train: Any, task: str, data_dir: str | None, peak_bytes: float | None,
                  capacity_bytes: float | None) -> str | None:
    """The advice line for a run of ``train`` (a TrainConfig) on ``task`` (None when the card was well used).

    Args:
        train: The run's TrainConfig (method, micro-batch, checkpointing, batch, crops).
        task: The task name.
        data_dir: The data folder, if any (planned with ``--data``).
        peak_bytes: The peak the CUDA allocator reserved on this rank.
        capacity_bytes: The card's memory.
    """
    if not peak_bytes or not capacity_bytes or peak_bytes >= UNUSED_SHARE * capacity_bytes:
        return None
    flags = ["phi3v-plan", "--method", train.method, "--num_crops", str(train.num_crops),
             "--batch_size", str(train.global_batch)]
    if data_dir:
        flags += ["--data", data_dir]
    elif task in _PLANNED_TASKS:
        flags += ["--task", task]
    checkpointing = "on" if train.gradient_checkpointing else "off"
    return (f"peak {peak_bytes / GIB:.1f} of {capacity_bytes / GIB:.1f} GiB at micro-batch {train.micro_batch}, "
            f"checkpointing {checkpointing}: a larger micro-batch or checkpointing off may fit and run faster; "
            f"{shlex.join(flags)} predicts the fastest layout for this card")


def cuda_peak_and_capacity() -> tuple[float | None, float | None]:
    """This rank's reserved peak and its card's memory (None, None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    device = torch.cuda.current_device()
    return float(torch.cuda.max_memory_reserved(device)), float(torch.cuda.get_device_properties(device).total_memory)
