"""This machine's memory against the planner's prediction, for ``phi3v-finetune`` (and the readers ``bench.fit`` shares).

``phi3v_core`` may not import the planner (tests/test_architecture.py), so ``phi3v-finetune`` finds this check as a
plugin: the ``phi3v_bench.fit_check`` entry point (pyproject.toml) names :func:`finetune_fit_problem`, and
:mod:`phi3v_core.training.fit_hook` calls whatever that group holds after the data is read and before any model is
built. The prediction is the planner's memory model (:func:`planner.estimate.estimate_memory`) for the run's layout and
its longest sample, host RAM per process as ``phi3v-bench`` counts it (:func:`planner.host_memory.process_host_bytes`);
the machine is NVML's memory per GPU and psutil's available host RAM less the share left to the system
(:func:`planner.host_memory.shortfall`). A run is refused only above the memory there is (never for the planner's
headroom margin), with both numbers; ``--force`` trains anyway.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

__all__ = ["device_memory_bytes", "finetune_fit_problem", "host_available_bytes"]

GIB = 1 << 30
#: Tasks with a planner profile (planner/data/recipes.json); a jsonl folder is profiled from its records.
_PROFILED = ("docvqa", "nlvr2", "hateful_memes", "ucf101")


def host_available_bytes() -> float | None:
    """RAM this node can give a new run now (``psutil.virtual_memory().available``; None if unreadable)."""
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no number, no refusal
        return None


def device_memory_bytes(nvml: Any | None = None) -> float | None:
    """Memory of the smallest visible GPU as NVML reports it (None: no GPU or unreadable)."""
    from phi3v_core.nvml import visible_devices

    sizes = [d.memory_total_bytes for d in visible_devices(nvml).devices if d.memory_total_bytes]
    return float(min(sizes)) if sizes else None


def _setup(train: Any, world: int, cuda: bool) -> Any:
    """The planner's description of ``train``'s step (a TrainConfig) on ``world`` processes."""
    from planner.train_setup import TrainSetup

    return TrainSetup.from_workload(
        train, world_size=world, grad_accum=train.gradient_accumulation_steps(world), zero2=train.uses_deepspeed(world),
        cuda=cuda, reduce_bucket=train.zero_reduce_bucket_size, allgather_bucket=train.zero_allgather_bucket_size,
        lora_rank=train.lora_rank, lora_lm_head=train.lora_lm_head, lora_vision=not train.freeze_vision,
    )  # fmt: skip


def _sample_shape(task: str, data_dir: str | None, shape: Any, num_crops: int) -> Any | None:
    """The longest sample of a jsonl folder, or the task's recipe profile (None: neither is known)."""
    from planner.estimate import SampleShape
    from planner.request import task_profiles

    if data_dir and task not in _PROFILED:
        from planner.dataprofile import profile_data

        # memory is judged on the records that can be read; bad ones are the data check's to report (or skip_bad's)
        profile = profile_data(data_dir, shape, num_crops, skip_bad=True)
        return profile.samples[profile.longest].sample_shape(shape, num_crops)
    if task not in _PROFILED:
        return None
    p = task_profiles()["tasks"][task]
    return SampleShape.from_images(shape, num_crops, (p["image_width"], p["image_height"]),
                                   images=p["images_per_sample"], text_tokens=p["text_tokens"],
                                   answer_tokens=p["answer_tokens"])


def finetune_fit_problem(train: Any, task: str, data_dir: str | None, world: int, local: int, cuda: bool) -> str | None:
    """One line when a ``phi3v-finetune`` run is predicted not to fit this machine (None: it fits, or unknown).

    Args:
        train: The run's TrainConfig.
        task: Task name (its recipe profile, or ``data_dir``'s longest record for jsonl data).
        data_dir: The data folder, if any.
        world: Processes of the run; ``local``: those on this node.
        cuda: It trains on GPUs.
    """
    from phi3v_core.environment import ram_bytes
    from planner.calibration import load_calibration
    from planner.estimate import estimate_memory
    from planner.host_memory import process_host_bytes, shortfall
    from planner.shapes import load_shape

    shape = load_shape(train.model)
    workload = _sample_shape(task, data_dir, shape, train.num_crops)
    if workload is None:
        return None
    setup = _setup(train, world, cuda)
    device_need = estimate_memory(shape, setup, workload, load_calibration().overheads).reserved if cuda else None
    host_need = process_host_bytes(shape, setup, workload, cuda) * local  # the check phi3v-bench runs (bench.fit)
    device_have = device_memory_bytes() if cuda else None
    parts = []
    if device_need is not None and device_have is not None and device_need > device_have:
        parts.append(f"{device_need / GIB:.1f} GiB per GPU (predicted reserved peak), {device_have / GIB:.1f} GiB on the card")
    if host := shortfall(host_need, host_available_bytes(), ram_bytes()):
        parts.append(host)
    if not parts:
        return None
    hint = _hint(train, shape, setup, workload, device_have, cuda)
    return (f"{train.method} on {train.model} at micro-batch {train.micro_batch} is predicted not to fit: needs "
            f"{'; '.join(parts)}{hint}; phi3v-plan ranks the layouts that fit; pass --force to train anyway")


def _hint(train: Any, shape: Any, setup: Any, workload: Any, device_have: float | None, cuda: bool) -> str:
    """``; micro-batch 1 with checkpointing would need N GiB`` when the smallest layout of the method is smaller; on a
    CPU at fp32 with the smallest layout already, what bf16 would need (``phi3v-bench``'s nearest layout, bench.fit)."""
    from planner.calibration import load_calibration
    from planner.estimate import estimate_memory
    from planner.host_memory import process_host_bytes

    if setup.micro_batch == 1 and setup.gradient_checkpointing:
        if cuda or setup.precision != "fp32":
            return ""
        bf16 = replace(setup, precision="bf16")
        return f"; bf16 (--precision bf16) is predicted at {process_host_bytes(shape, bf16, workload, cuda) / GIB:.1f} GiB"
    smallest = replace(setup, micro_batch=1, gradient_checkpointing=True)
    if cuda:
        need = estimate_memory(shape, smallest, workload, load_calibration().overheads).reserved
    else:
        need = process_host_bytes(shape, smallest, workload, cuda)
    return (f"; micro-batch 1 with checkpointing (--batch_size_per_gpu 1 --gradient_checkpointing on) is predicted "
            f"at {need / GIB:.1f} GiB")
