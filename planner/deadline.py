"""Cost, deadline and data checks around a plan: the Azure summary, the fewest nodes that meet a deadline, and the
samples of a ``--data`` folder that fit no micro-batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from planner.calibration import Calibration
from planner.estimate import estimate_memory
from planner.layouts import fits_with_headroom, setup_for
from planner.render import method_preference
from planner.request import Hardware, MethodPlan, Plan, PlanRequest
from planner.shapes import ModelShape

__all__ = ["azure_summary", "meet_deadline", "misfits"]


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


def misfits(
    profile: Any,
    shape: ModelShape,
    hw: Hardware,
    methods: list[MethodPlan],
    recommended: str | None,
    calibration: Calibration,
) -> dict[str, Any]:
    """Samples that fit no micro-batch (not even 1) under the recommended (or first supported) method's setup.

    Each is listed with the largest ``num_crops`` at which it would fit.
    """
    candidates = [m for m in methods if m.method == recommended] or [
        m for name in method_preference() for m in methods if m.method == name and m.supported
    ]
    if not candidates or candidates[0].memory is None:
        return {"method": None, "count": 0, "samples": []}
    chosen = candidates[0]
    hw_capacity = chosen.capacity_bytes
    base = replace(setup_for(chosen.method, hw.gpu, hw.world_size, chosen.hyperparameters), micro_batch=1)
    verdicts: dict[tuple[Any, ...], int | None] = {}
    found = []
    for sample, length in zip(profile.samples, profile.lengths, strict=True):
        key = (sample.image_sizes, sample.text_tokens)
        if key not in verdicts:
            fits_at: int | None = None
            for crops in range(profile.num_crops, 0, -1):
                memory = estimate_memory(shape, base, sample.workload(shape, crops), calibration.overheads)
                if fits_with_headroom(memory, hw_capacity, calibration):
                    fits_at = crops
                    break
            verdicts[key] = fits_at
        if verdicts[key] != profile.num_crops:
            found.append({"sample": sample.where, "seq_len": length, "fits_at_num_crops": verdicts[key]})
    found.sort(key=lambda item: -item["seq_len"])  # the longest first
    return {"method": chosen.method, "count": len(found), "samples": found[:20]}
