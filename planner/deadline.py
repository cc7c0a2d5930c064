"""Cost and deadline around a plan: the Azure summary and the fewest nodes that meet a deadline (the samples of a
``--data`` folder that fit no micro-batch: :mod:`planner.dataplan`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from planner.request import Hardware, MethodPlan, Plan, PlanRequest

__all__ = ["azure_summary", "meet_deadline"]


def azure_summary(hw: Hardware, best: MethodPlan | None) -> dict[str, Any] | None:
    """VM family, size, count and the vCPU quota to request (None off Azure)."""
    sku = hw.azure
    if sku is None:
        return None
    vcpus = sku.vcpus * hw.nodes if sku.vcpus else None
    return {
        "family": sku.family,
        "vm_size": sku.vm_size,
        "vms": hw.nodes,
        "gpus": hw.world_size,
        "vcpus_per_vm": sku.vcpus,
        "vcpu_quota": vcpus,
        "quota_note": (
            f"request {vcpus} vCPUs of the {sku.family} family in your region"
            if vcpus
            else f"vCPUs per {sku.family} VM are not in the table: check the SKU page, then request vCPUs x {hw.nodes}"
        ),
        "interconnect": f"{sku.intra_node}; {sku.inter_node}",
        "recommended_method": best.method if best else None,
        "source": sku.source,
    }


def meet_deadline(
    request: PlanRequest, plan_for: Callable[[PlanRequest], Plan], max_nodes: int = 64
) -> dict[str, Any]:
    """The fewest nodes (up to ``max_nodes``) whose recommended plan finishes all epochs within the deadline.

    Args:
        request: The request (``deadline_hours`` set).
        plan_for: Plans one request (the caller's :func:`planner.recommend.plan` with its detection and calibration).
        max_nodes: Give up above this many nodes.
    """
    assert request.deadline_hours is not None
    limit = request.deadline_hours * 3600
    for nodes in range(1, max_nodes + 1):
        trial = plan_for(replace(request, nodes=nodes, deadline_hours=None))
        best = trial.best
        if best is not None and best.run_s is not None and best.run_s <= limit:
            return {
                "hours": request.deadline_hours,
                "nodes": nodes,
                "gpus": trial.hardware.world_size,
                "method": best.method,
                "run_s": best.run_s,
                "cost_usd": best.cost_usd,
                "command": best.command,
            }
    return {"hours": request.deadline_hours, "nodes": None, "reason": f"not met with up to {max_nodes} nodes"}

