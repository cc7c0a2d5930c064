"""The plan's data loading from its request and hardware (:mod:`planner.dataload` holds the arithmetic)."""

from __future__ import annotations

from planner.dataload import DataLoading, node_cpus, plan_data_loading, stored_rate
from planner.estimate import SampleShape
from planner.request import Hardware, PlanRequest

__all__ = ["data_loading_for"]


def data_loading_for(
    samples_per_s_per_gpu: float, hw: Hardware, request: PlanRequest, workload: SampleShape
) -> DataLoading | None:
    """The plan's :class:`DataLoading`: the request's ``--processor_rate`` or the stored rate, the node's cores.

    Returns:
        None when no rate is known for the task (and none was given).
    """
    num_crops = workload.num_crops or 16
    if request.processor_rate:
        rate: tuple[float, str] | None = (request.processor_rate, "--processor_rate")
    else:
        rate = stored_rate(request.task, num_crops, workload.images)
    if rate is None:
        return None
    detected = hw.gpu.detected or hw.source.startswith("detected")
    cpus = node_cpus(request.cpus_per_node, detected, hw.azure.vcpus if hw.azure else None)
    return plan_data_loading(samples_per_s_per_gpu, hw.gpus_per_node, rate, cpus, workload.images)
