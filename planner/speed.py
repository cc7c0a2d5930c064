"""Throughput model: FLOPs per sample, calibrated MFU, ZeRO-2 communication → samples/s and time per epoch.

FLOPs count matmuls (2 FLOPs per multiply-add) the way torchtitan's MFU does (bench-planner-anchors.md §3.1/§4.1):
``2·P·tokens`` per forward for every linear layer plus ``4·L·h·s²`` for attention, with no discount for causal
masking and no recompute. Training multiplies the forward by 3 (full), by 2 where only input gradients flow (LoRA: the
frozen base computes no weight gradients) and by 1 for frozen parts (``frozen_vision``'s CLIP). Our model runs CLIP
on the real crops only; the reference recipe runs all ``num_crops + 1`` slots and all 24 CLIP layers, which is what
the calibration rows are converted with.

MFU (model FLOPs / peak) comes from the recipe's published img/s (``results/reference/speed.csv``, or the copy in
``planner/data/calibration.json``) per (architecture, method, attention class); see :mod:`planner.calibration`.
Multi-node runs add the ZeRO-2 gradient all-reduce that DeepSpeed issues after every micro-batch (DeepSpeed #2252)
plus the parameter all-gather after every optimizer step, over the nodes' InfiniBand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from planner.estimate import TrainSetup, Workload
from planner.hardware import GpuSpec
from planner.shapes import ModelShape

__all__ = [
    "FlopBreakdown",
    "Interconnect",
    "SpeedPrediction",
    "attention_class",
    "flops_per_sample",
    "format_duration",
    "predict_speed",
    "reference_shape",
]


@dataclass(frozen=True)
class FlopBreakdown:
    """Model FLOPs of one training sample (forward + backward, no recompute)."""

    language_model: float
    vision: float
    projector: float
    recompute: float

    @property
    def total(self) -> float:
        """Model FLOPs (what MFU divides)."""
        return self.language_model + self.vision + self.projector

    @property
    def hardware(self) -> float:
        """FLOPs the GPU actually executes, gradient-checkpointing recompute included."""
        return self.total + self.recompute

    def to_dict(self) -> dict[str, float]:
        """Plain dict (with totals)."""
        out = asdict(self)
        out.update(total=self.total, hardware=self.hardware)
        return out


def reference_shape(shape: ModelShape, method: str) -> ModelShape:
    """The shape the reference code runs: all CLIP layers for full/frozen, 23 for LoRA (``patch_clip_for_lora``)."""
    if method in ("lora", "qlora"):
        return shape
    return replace(shape, vision_feature_layer=shape.vision_layers)


def flops_per_sample(shape: ModelShape, workload: Workload, setup: TrainSetup) -> FlopBreakdown:
    """Model FLOPs of one sample under ``setup`` (method and checkpointing matter, micro-batch does not)."""
    counts = shape.param_counts()
    seq = workload.seq_len
    lm_linear = counts.lm_layer_linear + counts.lm_head
    lm_fwd = 2 * lm_linear * seq + 4 * shape.num_layers * shape.hidden_size * seq * seq
    patches = shape.patches_per_crop
    v_tokens = workload.vision_crops * patches
    conv = shape.vision_hidden * 3 * shape.patch_size**2
    clip_linear = shape.vision_used_layers * (
        4 * shape.vision_hidden**2 + 2 * shape.vision_hidden * shape.vision_intermediate
    )
    vision_fwd = 2 * clip_linear * v_tokens + 2 * conv * workload.vision_crops * (patches - 1)
    vision_fwd += 4 * shape.vision_used_layers * shape.vision_hidden * patches * patches * workload.vision_crops
    proj_fwd = 2 * (counts.projector_0 + counts.projector_2_weight) * workload.image_tokens

    method = setup.method
    lora_vision = method in ("lora", "qlora") and setup.lora_vision
    lm_mult = 2 if method in ("lora", "qlora") else 3
    vision_mult = 3 if method == "full" else (2 if lora_vision else 1)
    recompute = 0.0
    if setup.gradient_checkpointing:
        recompute += lm_fwd
        if vision_mult > 1:
            recompute += vision_fwd
    return FlopBreakdown(
        language_model=lm_mult * lm_fwd,
        vision=vision_mult * vision_fwd,
        projector=vision_mult * proj_fwd,
        recompute=recompute,
    )


def attention_class(attention: str, compute_capability: tuple[int, int]) -> str:
    """``flash`` (FlashAttention-2, or SDPA's flash kernel on Ampere+) or ``eager`` (S² kernels)."""
    if attention == "flash_attention_2":
        return "flash"
    if attention == "sdpa":
        # SDPA picks the flash kernel on sm80+ with 16-bit inputs; on Volta/Turing it takes the memory-efficient
        # kernel, which is not calibrated: the eager efficiency is the conservative stand-in.
        return "flash" if tuple(compute_capability) >= (8, 0) else "eager"
    return "eager"


@dataclass(frozen=True)
class Interconnect:
    """How the ranks talk.

    Attributes:
        gpus_per_node: Ranks per node.
        nodes: Nodes.
        intra_node_gbs: Per-GPU bandwidth inside a node, both directions (NVLink or PCIe), GB/s.
        nvlink: Whether the intra-node links are NVLink (the calibration rows ran over NVLink).
        inter_node_gbs: Network bandwidth per node (GB/s), e.g. 8×200 Gb/s HDR = 200.
        source: Where the numbers come from.
    """

    gpus_per_node: int
    nodes: int
    intra_node_gbs: float
    nvlink: bool
    inter_node_gbs: float
    source: str = ""


@dataclass(frozen=True)
class SpeedPrediction:
    """Predicted throughput for one plan.

    Attributes:
        samples_per_s: Global samples (images for single-image tasks) per second.
        per_gpu: Samples per second per GPU.
        mfu: Model-FLOPs utilisation used (before communication).
        mfu_source: Where that MFU comes from.
        flops: FLOPs per sample.
        compute_s: Compute time of one micro-step.
        comm_s: Exposed communication per micro-step (amortised all-gather included).
        step_s: Time of one optimizer step.
        epoch_s: Time of one epoch for ``dataset_size`` samples (None without a dataset size).
    """

    samples_per_s: float
    per_gpu: float
    mfu: float
    mfu_source: str
    flops: FlopBreakdown
    compute_s: float
    comm_s: float
    step_s: float
    epoch_s: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        out = asdict(self)
        out["flops"] = self.flops.to_dict()
        return out


def predict_speed(
    shape: ModelShape,
    workload: Workload,
    setup: TrainSetup,
    gpu: GpuSpec,
    interconnect: Interconnect,
    mfu: float,
    mfu_source: str,
    dataset_size: int | None = None,
    nccl_efficiency: float = 0.7,
) -> SpeedPrediction | None:
    """Samples/s and epoch time; None when the GPU's peak is unknown.

    The calibrated MFU already contains what a one-node NVLink run spends on communication, gradient checkpointing
    and the optimizer step at the recipe's settings (micro-batch 1, checkpointing on). This adds what differs: the
    recompute saved when checkpointing is off, the intra-node all-reduce when GPUs talk over PCIe, and the inter-node
    traffic of multi-node runs.
    """
    peak = gpu.peak_tflops(setup.precision)
    if not peak:
        return None
    flops = flops_per_sample(shape, workload, setup)
    with_gc = flops_per_sample(shape, workload, replace(setup, gradient_checkpointing=True))
    # MFU was measured with checkpointing on: hardware time scales with executed FLOPs.
    compute = setup.micro_batch * with_gc.total / (mfu * peak * 1e12) * (flops.hardware / with_gc.hardware)

    counts = shape.param_counts()
    zero2 = setup.zero == 2 and setup.method in ("full", "frozen_vision")
    lora = shape.lora_params(setup.lora_rank, setup.lora_lm_head, setup.lora_vision)
    trainable = counts.trainable(setup.method, lora)
    world = interconnect.gpus_per_node * interconnect.nodes
    comm = 0.0
    if world > 1:
        grad_bytes = 2 * trainable if zero2 else 4 * trainable
        g, n = interconnect.gpus_per_node, interconnect.nodes
        per_micro = 0.0
        if g > 1 and not interconnect.nvlink:
            per_micro += 2 * (g - 1) / g * grad_bytes / (interconnect.intra_node_gbs / 2 * nccl_efficiency * 1e9)
        if n > 1:
            # hierarchical all-reduce: each node moves 2(n-1)/n of the buffer through its NICs
            per_micro += 2 * (n - 1) / n * grad_bytes / (interconnect.inter_node_gbs * 1e9)
        if zero2:
            comm += per_micro  # ZeRO-2 reduces after every micro-batch, even under accumulation
            if n > 1:
                gather = (n - 1) / n * 2 * counts.total / (interconnect.inter_node_gbs * 1e9)
                comm += gather / setup.grad_accum
        else:
            comm += per_micro / setup.grad_accum  # DDP skips the all-reduce while accumulating (no_sync)
    micro = compute + comm
    per_gpu = setup.micro_batch / micro
    total = per_gpu * world
    epoch = dataset_size / total if dataset_size else None
    return SpeedPrediction(
        samples_per_s=total,
        per_gpu=per_gpu,
        mfu=mfu,
        mfu_source=mfu_source,
        flops=flops,
        compute_s=compute,
        comm_s=comm,
        step_s=micro * setup.grad_accum,
        epoch_s=epoch,
    )


def format_duration(seconds: float | None) -> str:
    """``3h 12m`` style."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f}s"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"
