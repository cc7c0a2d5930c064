"""Data loading of a plan: the CPU cores per GPU the processor needs at the predicted speed, and the workers to ask for.

A GPU that trains ``s`` samples per second needs the HD transform, tokenization and collation of ``s`` samples per
second from the CPU cores that feed it. One DataLoader worker runs on one core, so the cores per GPU are the predicted
samples/s divided by the processor's samples/s on one core. That rate is measured (``python -m bench.dataload``,
stored in ``planner/data/processor_rate.json`` with the CPU it ran on; every ``phi3v-bench run`` result stores the
rate of its machine too) or given with ``--processor_rate`` for other hardware. Torch-free: plain arithmetic.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

from phi3v_core.cli.vocabulary import THROUGHPUT_UNIT

__all__ = ["WORKER_HEADROOM", "DataLoading", "node_cpus", "plan_data_loading", "stored_rate"]

#: Workers per GPU = needed cores × this (slower pages, JPEG decoding, which the stored rate does not include).
WORKER_HEADROOM = 1.25


@cache
def _table() -> dict[str, Any]:
    return json.loads(resources.files("planner").joinpath("data/processor_rate.json").read_text())


def stored_rate(task: str, num_crops: int, images_per_sample: int | None = None) -> tuple[float, str] | None:
    """Stored samples/s per core for ``task`` at the nearest measured ``num_crops`` (None for an unknown task).

    Args:
        task: Task profile name.
        num_crops: HD crops per image.
        images_per_sample: Images per sample if it differs from the task's profile (the rate scales inversely).

    Returns:
        ``(rate, source)``: the rate and a sentence naming the CPU and the file.
    """
    table = _table()
    rates = table["samples_per_s_per_core"].get(task)
    if not rates:
        return None
    nearest = min(rates, key=lambda crops: (abs(int(crops) - num_crops), -int(crops)))
    rate = float(rates[nearest])
    base_images = table.get("images_per_sample", {}).get(task)
    if images_per_sample and base_images and images_per_sample != base_images:
        rate *= base_images / images_per_sample
    where = f"num_crops {nearest}" + ("" if int(nearest) == num_crops else f", the nearest measured to {num_crops}")
    return rate, f"measured on {table['cpu']} ({where}; planner/data/processor_rate.json)"


def node_cpus(cpus_per_node: int | None, detected: bool, azure_vcpus: int | None) -> tuple[int | None, str]:
    """CPU cores of one node and where the number comes from (None: unknown, a what-if plan without a count)."""
    if cpus_per_node:
        return cpus_per_node, "--cpus_per_node"
    if detected:
        try:
            return len(os.sched_getaffinity(0)), "this machine"
        except (AttributeError, OSError):
            return os.cpu_count(), "this machine"
    if azure_vcpus:
        return azure_vcpus, "the Azure SKU's vCPUs"
    return None, "unknown"


def _img(samples_per_s: float, images: int) -> str:
    """A rate of samples in the unit every command shows (a text-only sample counts as one)."""
    return f"{samples_per_s * max(images, 1):.2f} {THROUGHPUT_UNIT}"


@dataclass(frozen=True)
class DataLoading:
    """What feeding one GPU takes.

    Attributes:
        samples_per_s_per_gpu: Predicted samples per second of one GPU.
        rate_per_core: Processor samples per second on one core.
        rate_source: Where the rate comes from.
        cores_per_gpu: Cores the processor needs per GPU at the predicted speed.
        workers: ``--dataloader_num_workers`` for the command (needed cores with headroom, at most the free cores).
        node_cpus: Cores of one node (None: unknown).
        cpus_source: Where the core count comes from.
        free_cores_per_gpu: Cores per GPU left after each training process takes one (None: unknown).
        warning: Set when the node's cores cannot feed its GPUs.
        images: Images per sample: the sentences say img/s, the unit of every command (not in the JSON, whose rates
            are samples/s).
    """

    samples_per_s_per_gpu: float
    rate_per_core: float
    rate_source: str
    cores_per_gpu: float
    workers: int
    node_cpus: int | None
    cpus_source: str
    free_cores_per_gpu: float | None
    warning: str | None = None
    images: int = 1

    def line(self) -> str:
        """One line for the plan (rates in img/s)."""
        have = (
            f"; the node has {self.node_cpus} cores ({self.cpus_source}): {self.free_cores_per_gpu:.1f} free per GPU"
            if self.free_cores_per_gpu is not None
            else "; node cores unknown (pass --cpus_per_node)"
        )
        return (
            f"data loading: {self.cores_per_gpu:.1f} CPU cores per GPU for {_img(self.samples_per_s_per_gpu, self.images)} "
            f"at {_img(self.rate_per_core, self.images)} per core ({self.rate_source}) → --dataloader_num_workers "
            f"{self.workers}{have}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {k: v for k, v in asdict(self).items() if k != "images"}


def plan_data_loading(
    samples_per_s_per_gpu: float,
    gpus_per_node: int,
    rate: tuple[float, str],
    cpus: tuple[int | None, str],
    images: int = 1,
) -> DataLoading:
    """Cores per GPU, workers and the warning for one plan.

    Args:
        samples_per_s_per_gpu: Predicted samples/s of one GPU.
        gpus_per_node: GPUs (training processes) per node.
        rate: ``(samples/s per core, source)``.
        cpus: ``(cores per node or None, source)``.
        images: Images per sample (the sentences say img/s).
    """
    per_core, rate_source = rate
    node, cpus_source = cpus
    needed = samples_per_s_per_gpu / per_core
    workers = max(1, math.ceil(needed * WORKER_HEADROOM))
    free = None if node is None else max(0.0, node / gpus_per_node - 1)  # each training process keeps one core
    warning = None
    if free is not None:
        if needed > free:
            fed = free * per_core
            warning = (
                f"the node's {node} cores cannot feed its {gpus_per_node} GPU(s): the processor needs "
                f"{needed:.1f} cores per GPU for {_img(samples_per_s_per_gpu, images)}, {free:.1f} are free per GPU "
                f"(one per training process); the GPUs will wait for data (about {_img(fed, images)} per GPU); "
                "pre-process the images or use a node with more cores"
            )
        workers = max(1, min(workers, math.floor(free))) if free >= 1 else 1
    return DataLoading(
        samples_per_s_per_gpu, per_core, rate_source, needed, workers, node, cpus_source, free, warning, images
    )
