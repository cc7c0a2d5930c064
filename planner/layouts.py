"""Layout search for one method: every way ``phi3v-finetune`` can run it, predicted, and the fastest that fits.

A layout is (micro-batch, accumulation, gradient checkpointing, optimizer, offload). For each the memory model
predicts the reserved peak and the speed model the throughput; the plan takes, in this order of tiers,

1. plain AdamW (fp32 master weights on one GPU; ZeRO-2 over several), checkpointing on or off;
2. full/frozen_vision on one process only: bitsandbytes 8-bit AdamW on fp32 master weights (10 bytes per
   parameter: fp32 weight and gradient, 8-bit m and v);
3. full/frozen_vision only: bitsandbytes 8-bit AdamW with bf16 weights (6 bytes per parameter instead of 16);
4. full/frozen_vision only: DeepSpeed ZeRO-Offload of the optimizer to host memory (4 bytes per parameter on the
   GPU, 16 in host RAM; CPU Adam and PCIe copies every step),

the fastest layout that fits within the headroom rule in the first tier where any fits: 8-bit and offload are
recommended only where plain AdamW does not fit, because they cost precision or time. A layout must also keep its
updates: its **update retention** (:func:`layout_retention`, the share of weights a step at the recipe's learning
rate changes once stored) must be at least 50 %, which bf16 weights without a master copy miss at full
fine-tuning rates (8 % at 5e-6). Checkpointing is off wherever the memory allows (it recomputes every layer's
forward: ~1.3-1.5x the FLOPs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from phi3v_core.retention import RETENTION_FLOOR, update_retention
from phi3v_core.workload import Workload
from planner.calibration import Calibration, fit_speed_constants
from planner.estimate import SampleShape, estimate_memory, host_memory_bytes
from planner.hardware import GpuSpec, supports_bf16, supports_flash_attention
from planner.memory_types import GIB, MemoryEstimate
from planner.packing import FLASH, lengths_for, packed_memory, predict_packing, row_cost, scaled_speed, token_sums
from planner.request import Hardware, Layout, PlanRequest, task_profiles
from planner.shapes import ModelShape, load_shape
from planner.speed import SpeedConstants, SpeedPrediction, predict_speed
from planner.train_setup import TrainSetup, with_option

__all__ = [
    "Candidate",
    "batch_layouts",
    "checkpointing_options",
    "dataset_size",
    "estimate",
    "fits_with_headroom",
    "hyperparameters",
    "keeps_updates",
    "layout_retention",
    "option_tiers",
    "packed_twins",
    "search",
    "setup_for",
    "usable_limit",
]


def hyperparameters(task: str, method: str, global_batch: int) -> dict[str, Any]:
    """The recipe's hyper-parameters for ``task``/``method`` with the common ``TrainingArguments`` and sources."""
    data = task_profiles()
    common = dict(data["common"])
    source = common.pop("source")
    values = dict(data["tasks"][task]["methods"][method])
    method_source = values.pop("source")
    values.update({k: v for k, v in common.items() if k != "global_batch"})
    values["global_batch"] = global_batch
    if "lora_rank" in values:
        values["lora_alpha_ratio"] = values["lora_alpha"] / values["lora_rank"]
    values["source"] = f"{method_source}; {source}"
    return values


def setup_for(method: str, gpu: GpuSpec, world: int, hyper: dict[str, Any]) -> TrainSetup:
    """How ``phi3v-finetune`` runs ``method`` on ``world`` GPUs of ``gpu`` by default: the card's precision and
    attention, checkpointing on, AdamW, one sample per micro-step (the layout search varies the rest)."""
    cc = gpu.compute_capability
    run = Workload(method=method, precision="bf16" if supports_bf16(cc) else "fp16",
                      attn="flash_attention_2" if supports_flash_attention(cc) else "sdpa")
    return TrainSetup.from_workload(run, world_size=world, grad_accum=1, lora_rank=int(hyper.get("lora_rank", 64)))


def option_tiers(base: TrainSetup) -> list[list[tuple[str, str]]]:
    """(optim, offload) options by tier; 8-bit and offload only for full/frozen_vision (LoRA states are small)."""
    tiers: list[list[tuple[str, str]]] = [[("adamw", "none")]]
    if base.spec.trains_base:
        if base.zero == 0 and base.precision == "bf16":
            # under ZeRO-2 DeepSpeed keeps fp32 partitions anyway, and with fp16 adamw_8bit keeps fp32 weights
            tiers.append([("adamw_8bit_fp32_master", "none")])
        tiers += [[("adamw_8bit", "none")], [("adamw", "optimizer")]]
    return tiers


def layout_retention(setup: TrainSetup, learning_rate: float) -> float:
    """Share of trained weights a step of ``learning_rate`` changes once the optimizer stores it.

    The optimizer writes fp32 for LoRA/QLoRA (fp32 adapters) and under ZeRO-2 (DeepSpeed's fp32 partitions, also
    when offloaded); otherwise into the stored weights (fp32 master copy, or bf16 with 8-bit AdamW).
    """
    lora = setup.spec.uses_lora
    dtype = "fp32" if (lora or setup.zero == 2) else setup.stored_weight_dtype
    return update_retention(learning_rate, dtype)


def keeps_updates(candidate: Candidate) -> bool:
    """The layout applies at least :data:`~phi3v_core.retention.RETENTION_FLOOR` of its updates."""
    return candidate.layout.update_retention >= RETENTION_FLOOR


def batch_layouts(global_batch: int, world: int, max_micro: int) -> list[tuple[int, int, int]]:
    """(micro_batch, grad_accum, effective global batch) candidates, largest micro-batch last."""
    layouts = []
    micro = 1
    while micro <= max_micro:
        if global_batch % (micro * world) == 0:
            layouts.append((micro, global_batch // (micro * world), global_batch))
        micro *= 2
    if not layouts:  # the global batch does not split evenly: round it up to a multiple of the world size
        accum = max(1, -(-global_batch // world))
        layouts.append((1, accum, accum * world))
    return layouts


def dataset_size(request: PlanRequest) -> int:
    """Samples per epoch: given, from --data, or the task's real training set (planner/data/recipes.json)."""
    if request.dataset_size:
        return request.dataset_size
    return int(task_profiles()["tasks"][request.task]["dataset"]["train_samples"])


def usable_limit(capacity: float, calibration: Calibration) -> float:
    """The most a recommended plan may reserve: usable memory minus the stated margin."""
    return (1 - calibration.overheads.headroom_fraction) * capacity


def fits_with_headroom(memory: MemoryEstimate, capacity: float, calibration: Calibration) -> bool:
    """Reserved peak (allocated × fitted allocator overhead + context) under the usable memory minus the margin."""
    return memory.reserved <= usable_limit(capacity, calibration)


def estimate(
    shape: ModelShape,
    setup: TrainSetup,
    workload: SampleShape,
    calibration: Calibration,
    traces: dict[bool, dict[str, Any]] | None,
) -> MemoryEstimate:
    """The closed-form estimate, or the trace of the full model taken with the same checkpointing (``--trace``)."""
    memory = estimate_memory(shape, setup, workload, calibration.overheads)
    trace = (traces or {}).get(setup.gradient_checkpointing) if setup.checkpoint_towers == "both" else None
    if trace is None or trace.get("gradient_checkpointing") != setup.gradient_checkpointing:
        return memory
    from planner.trace import apply_trace

    return apply_trace(memory, shape, setup, workload, calibration.overheads, trace)


def host_ram_bytes(request: PlanRequest, hw: Hardware) -> tuple[float | None, str]:
    """Host memory per node and where the number comes from (None: unknown)."""
    if request.host_ram_gib:
        return request.host_ram_gib * GIB, "--host_ram_gib"
    if hw.gpu.detected or (hw.source.startswith("detected")):
        try:
            return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine"
        except (ValueError, OSError, AttributeError):
            return None, "unknown"
    return None, "unknown"


@dataclass
class Candidate:
    """A layout with its full setup, memory breakdown and speed (what :func:`search` returns)."""

    layout: Layout
    setup: TrainSetup
    memory: MemoryEstimate
    speed: SpeedPrediction | None
    tier: int


def search(
    base: TrainSetup,
    hw: Hardware,
    shape: ModelShape,
    workload: SampleShape,
    memory_shape: SampleShape,
    request: PlanRequest,
    calibration: Calibration,
    traces: dict[bool, dict[str, Any]] | None,
) -> list[Candidate]:
    """Every layout of ``base``'s method with predicted memory (on ``memory_shape``) and speed (on ``workload``)."""
    global_batch = request.global_batch or task_profiles()["common"]["global_batch"]
    learning_rate = float(hyperparameters(request.task, base.method, global_batch)["learning_rate"])
    constants, _fitted = fit_speed_constants(calibration, load_shape("phi-3-vision"))
    host, _host_source = host_ram_bytes(request, hw)
    capacity = hw.gpu.memory_bytes
    packing = PackingInputs(lengths_for(request, shape, workload.num_crops or 16), constants.rates(hw.gpu, base.precision),
                            constants, memory_shape)  # fmt: skip
    out = []
    for tier, options in enumerate(option_tiers(base)):
        for optim, offload in options:
            for checkpointing, towers in checkpointing_options(base):
                for micro, accum, _effective in batch_layouts(global_batch, hw.world_size, request.max_micro_batch):
                    setup = replace(
                        with_option(base, optim, offload),
                        micro_batch=micro,
                        grad_accum=accum,
                        gradient_checkpointing=checkpointing,
                        checkpoint_towers=towers,
                    )
                    memory = estimate(shape, setup, memory_shape, calibration, traces)
                    host_need = host_memory_bytes(shape, setup) * hw.gpus_per_node
                    fits = fits_with_headroom(memory, capacity, calibration) and (host is None or host_need <= host)
                    speed = predict_speed(
                        shape, workload, setup, hw.gpu, hw.interconnect(), constants, dataset_size(request)
                    )
                    layout = Layout(
                        micro, accum, checkpointing, optim, offload, memory.reserved, fits,
                        speed.samples_per_s if speed else None, host_need,
                        update_retention=layout_retention(setup, learning_rate), checkpoint_towers=towers,
                    )  # fmt: skip
                    out.append(Candidate(layout, setup, memory, speed, tier))
                    host_fits = host is None or host_need <= host
                    out += packed_twins(out[-1], shape, workload, packing, calibration, capacity, host_fits)
    return out


def checkpointing_options(base: TrainSetup) -> tuple[tuple[bool, str], ...]:
    """Checkpointing the search tries: both towers, the decoder only (where the image path trains: CLIP then keeps
    its activations, saving its recompute), and none."""
    vision_trains = "vision" in base.spec.trained_towers(not base.lora_vision, base.freeze_llm)
    return ((True, "both"), *(((True, "llm"),) if vision_trains else ()), (False, "both"))


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The fastest fitting layout that keeps its updates, of the first tier where any does (largest micro-batch when
    speed is unknown)."""
    for tier in sorted({c.tier for c in candidates}):
        fitting = [c for c in candidates if c.tier == tier and c.layout.fits and keeps_updates(c)]
        if fitting:
            return max(
                fitting,
                key=lambda c: (c.layout.samples_per_s or 0.0, c.layout.gradient_checkpointing is False, c.layout.micro_batch),
            )
    return None


@dataclass(frozen=True)
class PackingInputs:
    """What the packed twins of a search need: the plan's lengths, the device rates, the largest sample."""

    lengths: list[int]
    rates: Any
    constants: SpeedConstants
    largest: SampleShape


def packed_twins(
    padded: Candidate, shape: ModelShape, workload: SampleShape, inputs: PackingInputs, calibration: Calibration,
    capacity: float, host_fits: bool,
) -> list[Candidate]:
    """Price the padding of a padded layout (in place: the speed model runs the mean sample, as if unpadded) and
    return its ``--packing`` twins where packing is predicted to pay (:mod:`planner.packing`): at the default budget,
    and for sdpa/eager also at the data's longest sample as ``--pack_tokens`` (rows of several samples, attention
    over the whole row). Memory at the pack budget."""
    setup = padded.setup
    if setup.micro_batch == 1 or not inputs.lengths or inputs.rates is None or padded.speed is None:
        return []
    cost = row_cost(shape, setup, workload, inputs.rates, inputs.constants)
    longest = max(inputs.largest.seq_len, max(inputs.lengths))
    twins = []
    for budget in (None,) if setup.attn == FLASH else (None, longest):
        prediction = predict_packing(token_sums(inputs.lengths, setup.micro_batch, setup.attn, budget), setup.attn,
                                     budget, cost)  # fmt: skip
        if budget is None:  # the padded layout pays its padding
            padded.speed = scaled_speed(padded.speed, prediction.padded_slowdown)
            padded.layout.samples_per_s = padded.speed.samples_per_s if padded.speed else None
        speed = scaled_speed(padded.speed, prediction.speed_up and 1 / prediction.speed_up)
        if not prediction.pays or speed is None:
            continue
        memory = packed_memory(shape, setup, inputs.largest, budget, calibration.overheads)
        fits = fits_with_headroom(memory, capacity, calibration) and host_fits
        layout = replace(padded.layout, reserved_bytes=memory.reserved, fits=fits, samples_per_s=speed.samples_per_s,
                         packing=prediction.to_dict())  # fmt: skip
        twins.append(Candidate(layout, setup, memory, speed, padded.tier))
    return twins
