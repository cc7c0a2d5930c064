"""Calibration against the recipe's published speed/memory table.

The rows are read from ``results/reference/speed.csv`` when the source tree has it (the bench helper's typed-in copy
of recipe.md §11), else from the copy in ``planner/data/calibration.json`` (same numbers; a test checks they agree).
From the single-node rows we derive MFU per (architecture, method, attention class); multi-node rows validate the
communication model; the flash-attention rows fix the allocator/cache overhead of the memory model (§2.6 of
bench-planner-anchors.md). :func:`calibration_report` shows prediction vs published for every row.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from phi3v_core.errors import DataError
from planner.estimate import GIB, Overheads, TrainSetup, Workload, estimate_memory
from planner.hardware import GpuSpec, azure_skus, find_gpu
from planner.shapes import ModelShape
from planner.speed import Interconnect, attention_class, flops_per_sample, predict_speed, reference_shape

__all__ = [
    "AnchorRow",
    "Calibration",
    "calibration_report",
    "default_reference_dir",
    "fit_cache_fraction",
    "load_calibration",
]

#: Architectures without published rows borrow the efficiency of a relative (a stated assumption, shown to users).
ARCH_FALLBACK = {"Turing": "Volta", "Ada": "Ampere", "Hopper": "Ampere", "Blackwell": "Ampere"}


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
            attention=attention,
            gradient_checkpointing=True,
            micro_batch=1,
            grad_accum=max(1, 64 // self.gpus),
            world_size=self.gpus,
        )

    def workload(self, shape: ModelShape) -> Workload:
        """The recipe's DocVQA sample: mean sequence, all ``num_crops + 1`` slots through CLIP."""
        seq = round(self.avg_seq_tokens)
        return Workload(
            seq_len=seq,
            vision_crops=self.num_crops + 1,
            image_tokens=seq - 66,
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
        nccl_efficiency: Achieved share of the link bandwidth for intra-node all-reduce over PCIe.
        constants: The raw JSON (for ``--json``).
    """

    rows: tuple[AnchorRow, ...]
    rows_source: str
    overheads: Overheads
    overheads_source: str
    nccl_efficiency: float
    constants: dict[str, Any]

    def mfu_table(self, shape: ModelShape) -> dict[tuple[str, str, str], tuple[float, str]]:
        """MFU per (architecture, method, attention class) from the single-node, non-suspect rows."""
        table: dict[tuple[str, str, str], tuple[float, str]] = {}
        for row in self.rows:
            if row.nodes != 1 or row.suspect:
                continue
            gpu = find_gpu(row.gpu)
            setup = row.setup()
            flops = flops_per_sample(reference_shape(shape, row.method), row.workload(shape), setup).total
            peak = gpu.peak_tflops(setup.precision) * 1e12
            mfu = row.img_per_s / row.gpus * flops / peak
            key = (gpu.architecture, row.method, attention_class(setup.attention, gpu.compute_capability))
            table[key] = (mfu, f"{row.label}: {row.img_per_s} img/s ({self.rows_source})")
        return table

    def mfu_for(self, shape: ModelShape, gpu: GpuSpec, method: str, attention: str) -> tuple[float, str] | None:
        """Calibrated MFU for this GPU/method/attention, falling back along stated assumptions; None if nothing fits."""
        table = self.mfu_table(shape)
        attn = attention_class(attention, gpu.compute_capability)
        arch = gpu.architecture
        notes = []
        if (arch, method, attn) not in table and not any(k[0] == arch for k in table):
            if arch not in ARCH_FALLBACK:
                return None
            notes.append(f"{arch} uncalibrated: assumed {ARCH_FALLBACK[arch]} efficiency")
            arch = ARCH_FALLBACK[arch]
        if attention == "sdpa":
            notes.append("sdpa " + ("≈ flash kernel" if attn == "flash" else "calibrated as eager (conservative)"))

        def lookup(m: str, a: str) -> tuple[float, str] | None:
            return table.get((arch, m, a))

        found = lookup(method, attn)
        if found is None and method == "frozen_vision":
            found = lookup("full", attn)
            if found:
                notes.append("frozen-vision rows are suspect: full fine-tuning efficiency used")
        if found is None and method in ("lora", "qlora", "full"):
            # scale a neighbouring method by the ratio seen on the reference architecture (Ampere)
            for other in ("lora", "full", "qlora"):
                if other == method or lookup(other, attn) is None:
                    continue
                ref_m, ref_o = table.get(("Ampere", method, attn)), table.get(("Ampere", other, attn))
                if ref_m and ref_o:
                    base = lookup(other, attn)
                    found = (base[0] * ref_m[0] / ref_o[0], f"{base[1]} × Ampere {method}/{other} ratio")
                    notes.append(f"no {arch} {method} row: scaled from {other}")
                    break
        if found is None and attn == "flash" and lookup(method, "eager"):
            ref_f, ref_e = table.get(("Ampere", method, "flash")), table.get(("Ampere", method, "eager"))
            if ref_f and ref_e:
                base = lookup(method, "eager")
                found = (base[0] * ref_f[0] / ref_e[0], f"{base[1]} × Ampere flash/eager ratio")
        if found is None:
            return None
        mfu, source = found
        return mfu, "; ".join([source, *notes])


def default_reference_dir() -> Path:
    """``results/reference`` of the source tree the planner runs from."""
    return Path(__file__).resolve().parents[1] / "results" / "reference"


@cache
def _constants() -> dict[str, Any]:
    return json.loads(resources.files("planner").joinpath("data/calibration.json").read_text())


def _read_speed_csv(path: Path) -> tuple[AnchorRow, ...]:
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line_no, raw in enumerate(csv.DictReader(handle), start=2):
            try:
                rows.append(
                    AnchorRow(
                        gpu=raw["gpu"],
                        gpus_per_node=int(raw["gpus_per_node"]),
                        nodes=int(raw["nodes"]),
                        method=raw["method"],
                        flash_attention=raw["flash_attention"].strip().lower() == "true",
                        img_per_s=float(raw["img_per_s"]),
                        peak_gpu_mem_gb=float(raw["peak_gpu_mem_gb"]),
                        avg_seq_tokens=float(raw["avg_seq_tokens"]),
                        num_crops=int(raw["num_crops"]),
                        note=raw.get("note") or "",
                    )
                )
            except (KeyError, ValueError) as exc:
                raise DataError(
                    f"{path}:{line_no}: bad reference row ({exc}); fix the row or pass --reference"
                ) from None
    return tuple(rows)


def load_calibration(reference_dir: str | Path | None = None) -> Calibration:
    """Read the calibration constants and the published rows.

    Args:
        reference_dir: Folder with ``speed.csv``; None uses ``results/reference`` when present, else the packaged copy.

    Raises:
        DataError: An explicit ``reference_dir`` lacks ``speed.csv`` or a row is malformed.
    """
    constants = _constants()
    folder = Path(reference_dir) if reference_dir else default_reference_dir()
    csv_path = folder / "speed.csv"
    if csv_path.is_file():
        rows, source = _read_speed_csv(csv_path), str(csv_path)
    elif reference_dir:
        raise DataError(f"{csv_path}: not found; --reference must point at a folder with speed.csv")
    else:
        rows = tuple(AnchorRow(**row) for row in constants["reference_rows"])
        source = "planner/data/calibration.json (copy of recipe.md §11)"
    mem = constants["memory_overheads"]
    return Calibration(
        rows=rows,
        rows_source=source,
        overheads=Overheads(
            cache_fraction=mem["cache_fraction"],
            min_cache_fraction=mem["min_cache_fraction"],
            cuda_context_gib=mem["cuda_context_gib"],
            nccl_gib=mem["nccl_gib"],
        ),
        overheads_source=mem["source"],
        nccl_efficiency=constants["communication"]["nccl_efficiency"],
        constants=constants,
    )


def fit_cache_fraction(calibration: Calibration, shape: ModelShape) -> float:
    """Least-squares (relative error) fit of the allocator overhead on the flash-attention rows.

    Model: published ≈ allocated·(1 + f) + context. The no-flash rows are left out: the recipe's no-FA path also
    loads fp32 weights and its published peaks exceed anything the tensors explain (see :func:`calibration_report`).
    """
    num = den = 0.0
    for row in calibration.rows:
        if not row.flash_attention or row.suspect:
            continue
        setup = row.setup()
        est = estimate_memory(reference_shape(shape, row.method), setup, row.workload(shape))
        context = (calibration.overheads.cuda_context_gib + calibration.overheads.nccl_gib) * GIB
        published = row.peak_gpu_mem_gb * GIB
        num += (published - context - est.allocated) * est.allocated / published**2
        den += est.allocated**2 / published**2
    return num / den


def calibration_report(calibration: Calibration, shape: ModelShape) -> list[dict[str, Any]]:
    """Predicted vs published memory and speed for every reference row."""
    table = calibration.mfu_table(shape)
    out = []
    for row in calibration.rows:
        gpu = find_gpu(row.gpu)
        setup = row.setup()
        ref = reference_shape(shape, row.method)
        est = estimate_memory(ref, setup, row.workload(shape), calibration.overheads)
        key = (gpu.architecture, row.method, attention_class(setup.attention, gpu.compute_capability))
        single = table.get(key)
        speed = None
        if single:
            # The recipe ran on Azure: NDv2 (V100) and NDm A100 v4 (A100 80GB) InfiniBand per VM (spec §4.4).
            sku = next(s for s in azure_skus() if s.gpu == gpu.key)
            inter = Interconnect(
                row.gpus_per_node,
                row.nodes,
                gpu.nvlink_gbs or gpu.pcie_gbs or 32,
                bool(gpu.nvlink_gbs),
                sku.inter_node_gbs,
            )
            speed = predict_speed(
                ref, row.workload(shape), replace(setup, world_size=row.gpus), gpu, inter, single[0], single[1]
            )
        predicted_mem = est.expected_peak(gpu.memory_bytes) / GIB
        out.append(
            {
                "row": row.label,
                "published_gb": row.peak_gpu_mem_gb,
                "predicted_gb": round(predicted_mem, 2),
                "memory_error": round(predicted_mem / row.peak_gpu_mem_gb - 1, 4),
                "allocated_gib": round(est.allocated / GIB, 2),
                "published_img_per_s": row.img_per_s,
                "predicted_img_per_s": round(speed.samples_per_s, 3) if speed else None,
                "speed_error": round(speed.samples_per_s / row.img_per_s - 1, 4) if speed else None,
                "suspect": row.suspect,
                "flash_attention": row.flash_attention,
            }
        )
    return out
