"""Calibration against the recipe's published speed/memory table.

The rows come from the one reader of the published tables, :func:`phi3v_core.reference.reference_rows` (the
packaged ``phi3v_core/recipe.json`` copy of ``results/reference/speed.csv``, typed in from the speed table of the
Phi-3CookBook fine-tuning guide; ``--reference DIR`` reads a folder's ``speed.csv`` instead).
The speed model's few fitted constants (``calibration.json`` → ``speed.fit``) are each fitted on ONE named row; every
other row is held out and judged, the frozen-vision rows the reference marks as suspect are excluded with the reason
(:func:`fit_speed_constants`, :func:`calibration_report`, :func:`calibration_summary`). The flash-attention A100 rows
fix the allocator/cache overhead of the memory model (:func:`fit_cache_fraction`); the other rows judge it. The
A100 eager rows it misses are named with their unmodelled term and its size, next to the recorded evidence that their
tensors are accounted for (``calibration.json`` → ``memory_trace_evidence``); the settings the recipe also ran on
the 32 GB V100 bound what no prediction of the step's needs gets below (:mod:`planner.memory_floor`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from phi3v_core.constants import load_recipe
from phi3v_core.errors import DataError
from phi3v_core.reference import reference_rows, reference_source
from planner.estimate import SampleShape, estimate_memory
from planner.hardware import GpuSpec, azure_skus, find_gpu
from planner.memory_floor import memory_floor
from planner.memory_types import GIB, Overheads
from planner.shapes import ModelShape
from planner.speed import Interconnect, SpeedConstants, SpeedPrediction, predict_speed, reference_shape
from planner.train_setup import TrainSetup

__all__ = [
    "AnchorRow",
    "Calibration",
    "calibration_summary",
    "fit_speed_constants",
    "predict_row",
    "calibration_report",
    "reference_anchor_rows",
    "fit_cache_fraction",
    "load_calibration",
]

#: Published peaks at or above this share of the card are saturated: the caching allocator filled the card.
SATURATED = 0.97
#: Memory error allowed on held-out rows (issue #10).
MEMORY_TOLERANCE = 0.10


@dataclass(frozen=True)
class AnchorRow:
    """One published measurement (a row of ``speed.csv``)."""

    gpu: str
    gpus_per_node: int
    nodes: int
    method: str
    flash_attention: bool
    img_per_s: float
    peak_gpu_mem_gb: float
    avg_seq_tokens: float
    num_crops: int
    note: str = ""

    @property
    def gpus(self) -> int:
        """Total GPUs."""
        return self.gpus_per_node * self.nodes

    @property
    def suspect(self) -> bool:
        """Rows the reference README marks as implausible (frozen image model: 48-87 % MFU)."""
        return self.note.startswith("suspect")

    @property
    def label(self) -> str:
        """Short human label."""
        fa = "FA2" if self.flash_attention else "no FA"
        return f"{self.gpus_per_node}x{self.gpu} x{self.nodes} {self.method} {fa}"

    def setup(self) -> TrainSetup:
        """How the recipe ran this row: FA → bf16 weights and compute; no FA → fp32 weights, fp16 AMP, eager."""
        if self.flash_attention:
            precision, weights, attention = "bf16", None, "flash_attention_2"
        else:
            precision, weights, attention = "fp16", "fp32", "eager"
        return TrainSetup(
            method=self.method,
            precision=precision,
            weight_dtype=weights,
            attn=attention,
            gradient_checkpointing=True,
            micro_batch=1,
            grad_accum=max(1, 64 // self.gpus),
            world_size=self.gpus,
            logits="full",  # the recipe's code computes logits at every position
        )

    def sample_shape(self, shape: ModelShape) -> SampleShape:
        """The recipe's DocVQA sample: mean sequence, all ``num_crops + 1`` slots through CLIP."""
        seq = round(self.avg_seq_tokens)
        return SampleShape(
            seq_len=seq,
            vision_crops=self.num_crops + 1,
            image_tokens=seq - load_recipe().profiles["docvqa"].text_tokens,
            pixel_slots=self.num_crops + 1,
            crop_copy=False,
        )


@dataclass(frozen=True)
class Calibration:
    """Everything fitted or assumed, with provenance.

    Attributes:
        rows: The published rows.
        rows_source: Where they were read from.
        overheads: GPU memory overheads.
        overheads_source: Provenance of the overheads.
        constants: The raw JSON (for ``--json``).
    """

    rows: tuple[AnchorRow, ...]
    rows_source: str
    overheads: Overheads
    overheads_source: str
    constants: dict[str, Any]


@cache
def _constants() -> dict[str, Any]:
    return json.loads(resources.files("planner").joinpath("data/calibration.json").read_text())


def reference_anchor_rows(reference_dir: str | Path | None = None) -> tuple[AnchorRow, ...]:
    """The published speed rows (:func:`phi3v_core.reference.reference_rows`) as :class:`AnchorRow` values."""
    names = [f.name for f in fields(AnchorRow)]
    return tuple(AnchorRow(**{name: row[name] for name in names}) for row in reference_rows("speed", reference_dir))


def load_calibration(reference_dir: str | Path | None = None) -> Calibration:
    """Read the calibration constants and the published rows.

    Args:
        reference_dir: Folder with ``speed.csv``; None uses the packaged copy (``recipe.json``, = results/reference).

    Raises:
        DataError: An explicit ``reference_dir`` lacks ``speed.csv`` or a row is malformed.
    """
    constants = _constants()
    rows, source = reference_anchor_rows(reference_dir), reference_source("speed", reference_dir)
    mem = constants["memory_overheads"]
    return Calibration(
        rows=rows,
        rows_source=source,
        overheads=Overheads(
            cache_fraction=mem["cache_fraction"],
            min_cache_fraction=mem["min_cache_fraction"],
            cuda_context_gib=mem["cuda_context_gib"],
            nccl_gib=mem["nccl_gib"],
            headroom_fraction=mem.get("headroom_fraction", 0.05),
        ),
        overheads_source=mem["source"],
        constants=constants,
    )


def fit_cache_fraction(calibration: Calibration, shape: ModelShape, leave_out: str | None = None) -> float:
    """Least-squares (relative error) fit of the allocator overhead on the flash-attention rows.

    Model: published ≈ allocated·(1 + f) + context. The no-flash rows are left out: the recipe's no-FA path also
    loads fp32 weights and its published peaks exceed anything the tensors explain (see :func:`calibration_report`).
    ``leave_out`` names one row (its label) to fit without, so that row can be judged as held out.
    """
    num = den = 0.0
    for row in calibration.rows:
        if not row.flash_attention or row.suspect or row.label == leave_out:
            continue
        setup = row.setup()
        est = estimate_memory(reference_shape(shape, row.method), setup, row.sample_shape(shape))
        context = (calibration.overheads.cuda_context_gib + calibration.overheads.nccl_gib) * GIB
        published = row.peak_gpu_mem_gb * GIB
        num += (published - context - est.allocated) * est.allocated / published**2
        den += est.allocated**2 / published**2
    return num / den


def _leave_one_out_error_pct(row: AnchorRow, calibration: Calibration, shape: ModelShape) -> float:
    """Memory error of a flash row predicted with the allocator overhead fitted on the other flash rows."""
    overheads = replace(calibration.overheads, cache_fraction=fit_cache_fraction(calibration, shape, row.label))
    est = estimate_memory(reference_shape(shape, row.method), row.setup(), row.sample_shape(shape), overheads)
    return round(100 * (est.reserved / GIB / row.peak_gpu_mem_gb - 1), 1)


def _speed_values(calibration: Calibration) -> dict[str, Any]:
    values = dict(calibration.constants["speed"]["values"])
    values["matmul_efficiency"] = dict(values["matmul_efficiency"])
    return values


def _constants_from(values: dict[str, Any], calibration: Calibration, sources: dict[str, str]) -> SpeedConstants:
    return SpeedConstants(
        matmul_efficiency=dict(values["matmul_efficiency"]),
        matmul_source=dict(sources),
        bandwidth_efficiency=values["bandwidth_efficiency"],
        eager_bytes_per_score=values["eager_bytes_per_score"],
        elementwise_bytes_per_token=values["elementwise_bytes_per_token"],
        nf4_bytes_per_weight=values["nf4_bytes_per_weight"],
        ops_per_layer=values["ops_per_layer"],
        intra_node_efficiency=values["intra_node_efficiency"],
        network_efficiency=values["network_efficiency"],
        comm_overlap=values["comm_overlap"],
        step_overhead_s=values["step_overhead_s"],
        sources=dict(calibration.constants["speed"]["sources"]),
    )


def _row_interconnect(row: AnchorRow, gpu: GpuSpec) -> Interconnect:
    # The recipe ran on Azure: NDv2 (V100) and NDm A100 v4 (A100 80GB), InfiniBand per VM (``planner/data/azure.json``).
    sku = next(s for s in azure_skus() if s.gpu == gpu.key)
    return Interconnect(
        row.gpus_per_node, row.nodes, gpu.nvlink_gbs or gpu.pcie_gbs or 32, bool(gpu.nvlink_gbs), sku.inter_node_gbs
    )


def predict_row(row: AnchorRow, shape: ModelShape, constants: SpeedConstants) -> SpeedPrediction:
    """The speed model's prediction for one published row, run the way the recipe ran it."""
    gpu = find_gpu(row.gpu)
    setup = row.setup()
    prediction = predict_speed(
        reference_shape(shape, row.method), row.sample_shape(shape), setup, gpu, _row_interconnect(row, gpu), constants
    )
    assert prediction is not None  # the recipe's GPUs are all in the table
    return prediction


def _set(values: dict[str, Any], name: str, value: float) -> None:
    if "." in name:
        group, key = name.split(".", 1)
        values[group][key] = value
    else:
        values[name] = value


def fit_speed_constants(calibration: Calibration, shape: ModelShape) -> tuple[SpeedConstants, list[dict[str, Any]]]:
    """Fit the constants named in ``calibration.json`` → ``speed.fit``, each on its one named row, in order.

    Each fit is a bisection (on a log scale) of one constant until the prediction equals the published img/s,
    with the earlier fits in place. Returns the constants and what was fitted (constant, row, value).
    """
    key = (calibration.rows, shape, json.dumps(calibration.constants["speed"], sort_keys=True))
    if key not in _FITS:
        _FITS[key] = _fit(calibration, shape)
    return _FITS[key]


_FITS: dict[Any, tuple[SpeedConstants, list[dict[str, Any]]]] = {}


def _fit(calibration: Calibration, shape: ModelShape) -> tuple[SpeedConstants, list[dict[str, Any]]]:
    values = _speed_values(calibration)
    sources: dict[str, str] = {}
    fitted: list[dict[str, Any]] = []
    by_label = {row.label: row for row in calibration.rows}
    for item in calibration.constants["speed"]["fit"]:
        name, label = item["constant"], item["row"]
        row = by_label.get(label)
        if row is None:
            raise DataError(f"calibration.json: fit row {label!r} is not among the published rows")
        low, high = math.log(item["low"]), math.log(item["high"])

        def error(log_value: float, name: str = name, row: AnchorRow = row) -> float:
            trial = {**values, "matmul_efficiency": dict(values["matmul_efficiency"])}
            _set(trial, name, math.exp(log_value))
            predicted = predict_row(row, shape, _constants_from(trial, calibration, sources)).samples_per_s
            return math.log(predicted / row.img_per_s)

        increasing = error(high) > error(low)
        for _ in range(60):
            mid = (low + high) / 2
            if (error(mid) > 0) == increasing:
                high = mid
            else:
                low = mid
        value = math.exp((low + high) / 2)
        _set(values, name, value)
        if name.startswith("matmul_efficiency."):
            sources[name.split(".", 1)[1]] = f"fitted on {label}"
        fitted.append({"constant": name, "row": label, "value": value})
    return _constants_from(values, calibration, sources), fitted


def _memory_check(row: AnchorRow, reserved_gb: float, required_gb: float, card_gib: float) -> tuple[bool, str]:
    """Whether the memory prediction is right for this row, and why (saturated rows named; misses explained later)."""
    if row.peak_gpu_mem_gb >= SATURATED * card_gib:
        ok = required_gb <= card_gib <= reserved_gb * (1 + MEMORY_TOLERANCE)
        return ok, (
            f"saturated: published {row.peak_gpu_mem_gb:g} GB = the card; the allocator filled it. Checked as "
            f"needs {required_gb:.1f} <= card {card_gib:g} <= predicted reserved {reserved_gb:.1f} (+10 %)"
        )
    error = reserved_gb / row.peak_gpu_mem_gb - 1
    if abs(error) <= MEMORY_TOLERANCE:
        return True, ""
    return False, f"memory off by {100 * error:+.0f} %"


def _same_tensors_elsewhere(row: AnchorRow, results: list[dict[str, Any]]) -> str:
    """A row run with the same settings on another GPU whose peak the model gets right (same tensors, other card)."""
    for other in results:
        twin: AnchorRow = other["_anchor"]
        same = (twin.method, twin.flash_attention, twin.nodes, twin.gpus_per_node) == (
            row.method,
            row.flash_attention,
            row.nodes,
            row.gpus_per_node,
        )
        if same and twin.gpu != row.gpu and other["memory_ok"]:
            how = (
                "it fills that card"
                if other["memory_note"].startswith("saturated")
                else f"predicted {other['predicted_gb']:.1f}, {other['memory_error_pct']:+.0f} %"
            )
            return (
                f"; the same settings (same tensors) on {twin.gpus_per_node}x{twin.gpu} peak at "
                f"{twin.peak_gpu_mem_gb:g} GB ({how}), {row.peak_gpu_mem_gb - twin.peak_gpu_mem_gb:.0f} GB lower"
            )
    return ""


def _explain_miss(
    row: AnchorRow, result: dict[str, Any], results: list[dict[str, Any]], calibration: Calibration
) -> None:
    """Name the unmodelled term of a missed no-FA row and its size (fills ``memory_unmodelled_*`` in place).

    What was ruled out, with the evidence in ``calibration.json`` → ``memory_trace_evidence``: a missing tensor
    (the real model traced with the row's settings allocates what the closed form says, within a few %) and the
    fragmentation of the step's own allocations (replayed through the caching allocator's block rules: the eager
    LoRA step reserves about as much over its tensors as the flash one). Where the recipe ran the same settings on
    a smaller card, that card's peak is predicted right, so the excess is elastic: memory a run keeps when the card
    has room, not memory it needs. It is named and sized here, not predicted.
    """
    overheads = calibration.overheads
    context = overheads.cuda_context_gib + (overheads.nccl_gib if row.gpus > 1 else 0.0)
    allocated = result["allocated_gib"]
    gap = row.peak_gpu_mem_gb - result["predicted_gb"]
    implied = (row.peak_gpu_mem_gb - context) / allocated
    evidence = calibration.constants.get("memory_trace_evidence", {})
    traced = ""
    if row.label in evidence.get("rows", {}):
        recorded = evidence["rows"][row.label]
        result["traced_allocated_gib"] = recorded["traced_allocated_gib"]
        traced = (
            f"; the real model traced with these settings allocates {recorded['traced_allocated_gib']:.1f} GiB "
            f"(closed form {recorded['closed_form_allocated_gib']:.1f} on the same sample)"
        )
    replayed = ""
    replays = evidence.get("allocator_replay", {}).get("rows", {})
    if row.label in replays:
        flash = replays.get(row.label.replace("no FA", "FA2"))
        result["replayed_reserved_ratio"] = replays[row.label]["ratio"]
        replayed = (
            f"; its allocations replayed through the caching allocator's rules reserve "
            f"{replays[row.label]['ratio']:.2f}x the tensors" + (f" (flash: {flash['ratio']:.2f}x)" if flash else "")
        )
    setup = row.setup()
    if setup.spec.quantized:
        settings = "nf4 base + fp32 rest, fp16 autocast"
    elif setup.zero == 2:
        settings = "fp16 weights (DeepSpeed casts the fp32 load)"
    else:
        settings = "fp32 weights + fp16 autocast"
    result["memory_unmodelled_term"] = "elastic reserve"
    result["memory_unmodelled_gb"] = round(gap, 1)
    result["memory_note"] = (
        f"not modelled: an elastic reserve of {gap:+.1f} GB above the predicted peak (reserved/allocated "
        f"{implied:.2f} where the flash rows fit {1 + overheads.cache_fraction:.2f}). Not a missing tensor: "
        f"{allocated:.1f} GiB allocated ({settings}, eager attention, checkpointed){traced}{replayed}"
        f"{_same_tensors_elsewhere(row, results)}. Memory kept while the card has room (allocator cache, "
        "buffers outside the tensors); plans are judged on the modelled peak"
    )


def calibration_report(calibration: Calibration, shape: ModelShape) -> list[dict[str, Any]]:
    """Predicted vs published memory and speed for every reference row, with each row's role.

    ``role`` is the row's role for speed: ``fitted`` (a constant was fitted on it), ``held_out`` (judged only) or
    ``excluded`` (the frozen-vision rows, set aside after they disagreed; ``reason`` says why). ``memory_role``
    says the same for the allocator overhead, which is fitted on the flash-attention rows;
    ``memory_held_out_error_pct`` is each row's memory error as a prediction: a fitted row's with the overhead fitted
    on the other flash rows (leave-one-out), a held-out row's as is, None where the published peak is the card
    (``memory_saturated``) or the row is excluded. A held-out row whose
    memory misses by more than 10 % names what is not modelled and by how much (``memory_unmodelled_term``,
    ``memory_unmodelled_gb``: published minus predicted) and, where recorded, what the real model traced with the
    row's settings allocates (``traced_allocated_gib``) and what a replay of its allocations through the caching
    allocator's rules reserves over them (``replayed_reserved_ratio``).
    """
    constants, fitted = fit_speed_constants(calibration, shape)
    fitted_rows = {item["row"]: item["constant"] for item in fitted}
    out = []
    for row in calibration.rows:
        gpu = find_gpu(row.gpu)
        setup = row.setup()
        ref = reference_shape(shape, row.method)
        est = estimate_memory(ref, setup, row.sample_shape(shape), calibration.overheads)
        speed = predict_row(row, shape, constants)
        reserved = est.reserved / GIB
        required = est.required / GIB
        memory_ok, memory_note = _memory_check(row, reserved, required, gpu.memory_gib)
        if row.suspect:
            # honest about the order: these rows were set aside after the model disagreed with them, not before
            role, reason = "excluded", f"frozen-vision row, excluded after it disagreed with the model ({row.note})"
        elif row.label in fitted_rows:
            role, reason = "fitted", f"{fitted_rows[row.label]} fitted on this row"
        else:
            role, reason = "held_out", ""
        memory_role = "excluded" if row.suspect else ("fitted" if row.flash_attention else "held_out")
        memory_error_pct = round(100 * (reserved / row.peak_gpu_mem_gb - 1), 1)
        saturated = row.peak_gpu_mem_gb >= SATURATED * gpu.memory_gib
        if memory_role == "fitted":  # judged as held out: the overhead fitted on the other flash rows
            held_out_error: float | None = _leave_one_out_error_pct(row, calibration, shape)
        else:  # a published peak equal to the card says the allocator filled it, not what the step needs
            held_out_error = memory_error_pct if memory_role == "held_out" and not saturated else None
        out.append(
            {
                "_anchor": row,
                "row": row.label,
                "gpu": row.gpu,
                "method": row.method,
                "gpus_per_node": row.gpus_per_node,
                "nodes": row.nodes,
                "card_gib": gpu.memory_gib,
                "role": role,
                "reason": reason,
                "memory_role": memory_role,
                "published_gb": row.peak_gpu_mem_gb,
                "predicted_gb": round(reserved, 2),
                "required_gb": round(required, 2),
                "memory_error_pct": memory_error_pct,
                "memory_held_out_error_pct": held_out_error,
                "memory_saturated": saturated,
                "memory_ok": memory_ok,
                "memory_note": memory_note,
                "allocated_gib": round(est.allocated / GIB, 2),
                "published_img_per_s": row.img_per_s,
                "predicted_img_per_s": round(speed.samples_per_s, 3),
                "speed_error_pct": round(100 * (speed.samples_per_s / row.img_per_s - 1), 1),
                "predicted_times_s": {k: round(v, 4) for k, v in speed.times.items()},
                "suspect": row.suspect,
                "flash_attention": row.flash_attention,
                "memory_unmodelled_term": "",
                "memory_unmodelled_gb": 0.0,
            }
        )
    for result in out:
        row = result["_anchor"]
        if not result["memory_ok"] and not row.flash_attention and not row.suspect:
            _explain_miss(row, result, out, calibration)
    for result in out:
        del result["_anchor"]
    return out


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2 if ordered else None


def calibration_summary(rows: list[dict[str, Any]], fitted: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out speed and memory errors (median, max) and memory misses: what the tests and ``--calibration`` judge.

    Memory is judged on predictions only: the flash rows leave-one-out, the rows never fitted as they are; rows whose
    published peak is the card (saturated) are counted apart, with how many agree with a full card. ``memory_floor``
    (:func:`planner.memory_floor.memory_floor`) is the never-fitted median no prediction of the step's needs reaches
    below, from the settings the recipe also ran on the smaller card.
    """
    held = [abs(r["speed_error_pct"]) for r in rows if r["role"] == "held_out"]
    memory = [abs(r["memory_held_out_error_pct"]) for r in rows if r["memory_held_out_error_pct"] is not None]
    never_fitted = [
        abs(r["memory_held_out_error_pct"])
        for r in rows
        if r["memory_role"] == "held_out" and r["memory_held_out_error_pct"] is not None
    ]
    saturated = [r for r in rows if r["memory_role"] == "held_out" and r["memory_saturated"]]
    return {
        "fitted_constants": fitted,
        "held_out_rows": len(held),
        "held_out_speed_error_median_pct": _median(held),
        "held_out_speed_error_max_pct": max(held) if held else None,
        "held_out_memory_rows": len(memory),
        "held_out_memory_error_median_pct": _median(memory),
        "held_out_memory_error_max_pct": max(memory) if memory else None,
        "never_fitted_memory_rows": len(never_fitted),
        "never_fitted_memory_error_median_pct": _median(never_fitted),
        # what no prediction of the step's needs goes below (the same settings ran in less on the V100)
        "memory_floor": memory_floor(rows),
        "saturated_memory_rows": len(saturated),
        "saturated_memory_rows_consistent": sum(r["memory_ok"] for r in saturated),
        "excluded_rows": [r["row"] for r in rows if r["role"] == "excluded"],
        "memory_misses": [
            {
                "row": r["row"],
                "memory_error_pct": r["memory_error_pct"],
                "unmodelled_term": r["memory_unmodelled_term"],
                "unmodelled_gb": r["memory_unmodelled_gb"],
                "why": r["memory_note"],
            }
            for r in rows
            if r["role"] != "excluded" and not r["memory_ok"]
        ],
    }
