"""``plan(request) -> Plan``: what fits on the hardware, what to run and how fast it will go (no printing).

Decision rules (each shows up as a reason in the plan):

* precision: bf16 only on compute capability ≥ 8.0 (``torch.cuda.is_bf16_supported()`` also says True on V100/T4,
  where bf16 is emulated); otherwise fp16 mixed precision with loss scaling;
* attention: FlashAttention-2 on ≥ 8.0 with 16-bit tensors, else SDPA (its memory-efficient kernel has no S²
  buffers on Volta/Turing either); eager is never recommended;
* QLoRA needs bitsandbytes NF4 kernels (planner.hardware.qlora_unsupported_reason);
* on a detected machine only what is installed (:class:`phi3v_core.software.Software`): no FlashAttention-2
  without flash-attn (the plan says what installing it would gain), QLoRA by the bitsandbytes library that will
  load with this torch, optimizer offload only where DeepSpeed can build its CPU Adam; a what-if plan (``--gpu``)
  states what it assumes instead;
* model states as ``phi3v-finetune`` runs them: full/frozen with DeepSpeed ZeRO-2 (5e7-element buckets, the
  training default) when more than one GPU, plain AdamW with fp32 master weights on one GPU; LoRA/QLoRA with DDP;
* layout (:mod:`planner.layouts`): micro-batch × accumulation × gradient checkpointing (on/off) × optimizer
  (AdamW; for full/frozen_vision also 8-bit AdamW, then the optimizer offloaded to host memory, each only where the
  previous does not fit): the fastest that fits within the headroom rule;
* recommended method: the recipe's order (``recipe.json``'s ``method_preference``: full fine-tuning "whenever
  possible", else LoRA, else QLoRA, else the frozen-vision variant) with its published ANLS.

Request and result types live in :mod:`planner.request`, the layout search in :mod:`planner.layouts`, the command
and the reasons' text in :mod:`planner.render`, cost/deadline/data checks in :mod:`planner.deadline`.
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType
from typing import Any

from phi3v_core.cli.vocabulary import THROUGHPUT_UNIT, plural
from phi3v_core.constants import CONTEXT_LENGTH, ZERO_BUCKET_ELEMENTS
from phi3v_core.errors import ConfigError
from phi3v_core.methods import get_method
from phi3v_core.software import Software, bnb_arch_range, torch_gpu_problem
from planner.calibration import Calibration, load_calibration
from planner.dataplan import data_summary, read_data, size_schedule
from planner.deadline import azure_summary, meet_deadline
from planner.estimate import SampleShape
from planner.feeding import data_loading_for
from planner.hardware import (
    Detection,
    azure_skus,
    detect,
    qlora_unsupported_reason,
    supports_bf16,
    supports_flash_attention,
)
from planner.layouts import (
    Candidate,
    choose,
    dataset_size,
    hyperparameters,
    search,
    setup_for,
    usable_limit,
)
from planner.memory_types import GIB
from planner.packing import packing_reason
from planner.render import MODEL_PLACEHOLDER, command, method_preference, top_items, why_method
from planner.request import (
    COMMON_GPUS,
    DEFAULT_INTER_NODE_GBIT,
    Hardware,
    Layout,
    MethodPlan,
    Plan,
    PlanRequest,
    task_profiles,
)
from planner.shapes import ModelShape, load_shape
from planner.speed import format_duration
from planner.train_setup import TrainSetup

__all__ = [
    "COMMON_GPUS",
    "MODEL_PLACEHOLDER",
    "Hardware",
    "Layout",
    "MethodPlan",
    "Plan",
    "PlanRequest",
    "plan",
    "survey",
    "task_profiles",
]


def _sample_shape(request: PlanRequest, shape: ModelShape) -> SampleShape:
    task = task_profiles()["tasks"][request.task]
    images = task["images_per_sample"] if request.images_per_sample is None else request.images_per_sample
    num_crops = request.num_crops or task["num_crops"]
    size = request.image_size or (task["image_width"], task["image_height"])
    text = task["text_tokens"] if request.text_tokens is None else request.text_tokens
    if images == 0:
        workload = SampleShape(seq_len=text, vision_crops=0, image_tokens=0, images=0, pixel_slots=0)
    else:
        workload = SampleShape.from_images(
            shape, num_crops, size, images=images, text_tokens=text, answer_tokens=task["answer_tokens"]
        )
    if request.seq_len:
        workload = replace(workload, seq_len=request.seq_len, image_tokens=min(workload.image_tokens, request.seq_len))
    return workload


def _hardware(request: PlanRequest, detection: Detection | None) -> tuple[Hardware, list[str]]:
    notes: list[str] = []
    sku = None
    if request.states_gpu:
        gpu, source = request.gpu_spec(), "stated (--gpu)" if request.gpu_memory_gib is None else "stated (--gpu_memory_gib)"
        count = request.count
        nvlink = bool(gpu.nvlink_gbs)
    elif detection is not None and detection.ok:
        gpu = detection.spec
        assert gpu is not None
        names = sorted({g.name for g in detection.gpus})
        source = f"detected ({detection.count}x {' + '.join(names)}, driver {detection.driver}, CUDA {detection.cuda_driver})"
        count = request.count or detection.count
        nvlink = detection.nvlink
        if not detection.homogeneous:
            notes.append(
                f"GPUs differ ({', '.join(names)}): planned for the weakest, {gpu.key} ({gpu.memory_gib:g} GiB); "
                "a data-parallel job runs at its memory and pace"
            )
        notes.extend(detection.notes)
    else:
        raise ConfigError("no GPU detected and no --gpu given; pass --gpu NAME (see --list-gpus)")
    if request.cloud == "azure":
        candidates = [s for s in azure_skus() if s.gpu == gpu.key]
        if candidates:
            sku = candidates[0]
            count = request.count or sku.gpus_per_vm
            if count != sku.gpus_per_vm:
                notes.append(f"{sku.vm_size} has {sku.gpus_per_vm} GPUs; planning with {count} per VM")
        else:
            notes.append(f"no Azure ND SKU in the table carries {gpu.key}")
    count = count or 1
    if request.inter_node_gbit:
        inter, inter_source = request.inter_node_gbit / 8, f"--inter-node-gbit {request.inter_node_gbit:g}"
    elif sku is not None:
        inter, inter_source = sku.inter_node_gbs, f"{sku.family}: {sku.inter_node}"
    else:
        inter = DEFAULT_INTER_NODE_GBIT / 8
        inter_source = f"assumed {DEFAULT_INTER_NODE_GBIT:g} Gb/s per node (pass --inter-node-gbit)"
        if request.nodes > 1:
            notes.append(f"inter-node network unknown: {inter_source}")
    return (
        Hardware(gpu, count, request.nodes, source, nvlink and count > 1, inter, inter_source, sku),
        notes,
    )



def _support_reasons(method: str, hw: Hardware, software: Software | None) -> tuple[bool, list[str]]:
    """Whether the GPU (and, on a detected machine, its software) can run ``method``, and precision/attention notes."""
    gpu = hw.gpu
    cc = gpu.compute_capability
    reasons: list[str] = []
    supported = True
    unsupported = None
    if get_method(method).quantized:
        if software is not None and not software.bitsandbytes:
            unsupported = "QLoRA needs bitsandbytes, which is not installed here (pip install bitsandbytes)"
        else:
            unsupported = qlora_unsupported_reason(cc, software.bnb if software is not None else None)
        if not unsupported:
            reasons.extend(_qlora_assumption(cc, software))
    if unsupported:
        supported = False
        reasons.append(unsupported)
    if not supports_bf16(cc):
        reasons.append(
            f"{gpu.architecture} has no native bf16 → fp16 mixed precision with loss scaling (~1 point lower accuracy in the recipe)"
        )
    if not supports_flash_attention(cc):
        reasons.append("FlashAttention-2 needs Ampere+ → SDPA (memory-efficient kernel, no S² buffers)")
    return supported, reasons


def _qlora_assumption(cc: tuple[int, int], software: Software | None) -> list[str]:
    """What a QLoRA plan rests on: the library that loads here, or (what-if) the torch builds whose library runs it."""
    if software is not None:
        if software.bnb is None:
            return ["bitsandbytes: torch here has no CUDA build, so no library to check (assumed to hold this GPU)"]
        return [f"bitsandbytes loads {software.bnb.describe()} ({software.bnb.source}): it holds this GPU"]
    builds = []
    for toolkit, label in (((13, 0), "CUDA 13 (the default torch wheel)"), ((12, 8), "CUDA 12.8"), ((12, 6), "CUDA 12.6")):
        least, most = bnb_arch_range(toolkit)
        if least <= cc and (most is None or cc <= most):
            builds.append(label)
    return [
        f"what-if: assumes bitsandbytes with a torch build for {' or '.join(builds)} on the target (bitsandbytes "
        f"loads the library of torch's CUDA version; CUDA 13's holds compute capability 7.5+ only)"
    ]


def _flash_gain(
    base: TrainSetup, pick: Candidate, args: tuple[Any, ...], request: PlanRequest, supported: bool
) -> str:
    """The reason for SDPA where flash-attn is missing: what installing it would gain, as the planner predicts it."""
    hw, shape, workload, memory_shape, calibration, traces = args
    flash = choose(search(replace(base, attn="flash_attention_2"), hw, shape, workload, memory_shape, request,
                          calibration, traces)) if supported else None  # fmt: skip
    head = "flash-attn is not installed here → SDPA (PyTorch's fused kernels, no S² buffers)"
    fix = "pip install flash-attn --no-build-isolation"
    if flash is None or not pick.layout.fits:
        return f"{head}; installing it ({fix}) would let the command use --use_flash_attention"
    speed = (flash.layout.samples_per_s or 0.0) / (pick.layout.samples_per_s or 1.0)
    saved = (pick.memory.reserved - flash.memory.reserved) / GIB
    if abs(speed - 1) < 0.005 and abs(saved) < 0.05:
        gain = (
            "no predicted speed or memory: the planner models SDPA's fused kernels like FlashAttention-2; the "
            "recipe's commands use it (--use_flash_attention)"
        )
    else:
        gain = f"a predicted {speed:.2f}x the speed and {saved:+.1f} GiB less reserved peak"
    return f"{head}; installing it ({fix}) would gain {gain}"


def _fit_reason(method: str, hw: Hardware, pick: Candidate, fits: bool, calibration: Calibration) -> str:
    """The first reason: fits (peak, limit, margin, largest parts) or does not (and what to try)."""
    capacity = hw.gpu.memory_bytes
    memory = pick.memory
    limit = usable_limit(capacity, calibration)
    share = 1 - calibration.overheads.headroom_fraction
    need = memory.reserved / GIB
    if fits:
        return (
            f"fits: predicted reserved peak {need:.1f} of {hw.gpu.memory_gib:g} GiB at micro-batch "
            f"{pick.setup.micro_batch} (limit {limit / GIB:.1f} GiB = {share:.0%} of the card, margin "
            f"{(capacity - memory.reserved) / GIB:.1f} GiB; {top_items(memory)} GiB; peak at {memory.phase})"
        )
    hint = (
        "more GPUs (ZeRO-2 shards the optimizer states)"
        if get_method(method).trains_base
        else "fewer crops (--num-crops) or a larger GPU"
    )
    return (
        f"does not fit: predicted reserved peak {need:.1f} GiB at micro-batch 1 with checkpointing, above "
        f"{limit / GIB:.1f} GiB ({share:.0%} of {hw.gpu.memory_gib:g}) ({top_items(memory)} GiB); try {hint}"
    )


def _layout_reasons(
    pick: Candidate, candidates: list[Candidate], hw: Hardware, host_source: str, images: int
) -> tuple[list[str], float | None]:
    """Why this checkpointing/optimizer/offload (with the trade-off), and the speed-up over checkpointing."""
    reasons: list[str] = []
    chosen = pick.layout
    same = [c for c in candidates if c.tier == pick.tier and c.layout.fits]
    checkpointed = [c for c in same if c.layout.gradient_checkpointing and c.layout.samples_per_s]
    speedup = None
    if not chosen.gradient_checkpointing and checkpointed and chosen.samples_per_s:
        best_gc = max(checkpointed, key=lambda c: c.layout.samples_per_s or 0.0)
        speedup = chosen.samples_per_s / (best_gc.layout.samples_per_s or chosen.samples_per_s)
        reasons.append(
            f"gradient checkpointing off: fits without recompute, predicted {speedup:.2f}x the speed of the best "
            f"checkpointed layout ({best_gc.layout.micro_batch} x {best_gc.layout.grad_accum}, "
            f"{best_gc.layout.samples_per_s * max(images, 1):.2f} {THROUGHPUT_UNIT})"
        )
    elif chosen.gradient_checkpointing:
        reasons.append("gradient checkpointing on: no layout without it fits (it recomputes each layer's forward)")
    plain = [c for c in candidates if c.tier == 0]
    plain_need = min(c.memory.reserved for c in plain) / GIB if plain else 0.0
    if chosen.optim == "adamw_8bit":
        reasons.append(
            f"8-bit AdamW (bitsandbytes) with {pick.setup.stored_weight_dtype} weights: plain AdamW needs at least "
            f"{plain_need:.1f} GiB; trade-off: no fp32 master copy (update retention {chosen.update_retention:.0%}: "
            "steps under half a bf16 ulp round away), optimizer states quantised blockwise"
        )
    if chosen.optim == "adamw_8bit_fp32_master":
        reasons.append(
            f"8-bit AdamW (bitsandbytes) on fp32 master weights (10 bytes per parameter): plain AdamW needs at least "
            f"{plain_need:.1f} GiB; update retention {chosen.update_retention:.0%}; trade-off: optimizer states "
            "quantised blockwise"
        )
    if chosen.offload == "optimizer":
        extra = sum(v for k, v in (pick.speed.times if pick.speed else {}).items() if "CPU Adam" in k or "PCIe" in k)
        have = "" if host_source == "unknown" else f" ({host_source} checked)"
        reasons.append(
            f"optimizer offloaded to host memory (DeepSpeed ZeRO-Offload, CPU Adam): plain AdamW needs at least "
            f"{plain_need:.1f} GiB on the GPU; trade-off: {chosen.host_bytes / GIB:.0f} GiB of host RAM per node"
            f"{have or ' (not checked: pass --host_ram_gib)'}, +{extra:.1f} s per optimizer step for CPU Adam and "
            f"PCIe copies"
        )
    return reasons, speedup


def _retention_reasons(candidates: list[Candidate], chosen: Candidate | None, learning_rate: float) -> list[str]:
    """Why fitting layouts that lose their updates were passed over (their retention at the recipe's rate): those
    the plan would otherwise have taken (an earlier tier) or that are faster than the chosen one; any when nothing
    was chosen."""
    from planner.layouts import keeps_updates

    def tempting(c: Candidate) -> bool:
        if chosen is None or c.tier < chosen.tier:
            return True
        return (c.layout.samples_per_s or 0.0) > (chosen.layout.samples_per_s or 0.0)

    lossy: dict[str, Candidate] = {}
    for c in candidates:
        if c.layout.fits and not keeps_updates(c) and tempting(c):
            lossy.setdefault(c.layout.optim, c)
    if not lossy:
        return []
    named = ", ".join(
        f"{optim} ({c.setup.stored_weight_dtype} weights, update retention {c.layout.update_retention:.0%})"
        for optim, c in lossy.items()
    )
    return [
        f"not recommended although {'it fits' if len(lossy) == 1 else 'they fit'}: {named}: at lr "
        f"{learning_rate:g} a step changes under 50 % of the weights (the rest round away), so the run would "
        "barely learn (use fp32 master weights: adamw_8bit_fp32_master, adamw, or the offloaded optimizer)"
    ]


def _plan_method(
    method: str,
    hw: Hardware,
    shape: ModelShape,
    workload: SampleShape,
    request: PlanRequest,
    calibration: Calibration,
    traces: dict[bool, dict[str, Any]] | None,
    memory_shape: SampleShape | None = None,
    software: Software | None = None,
) -> MethodPlan:
    """One method's plan; ``software`` is the detected machine's (None: what-if hardware, assumptions stated)."""
    from planner.layouts import host_ram_bytes

    world = hw.world_size
    global_batch = request.global_batch or task_profiles()["common"]["global_batch"]
    hyper = hyperparameters(request.task, method, global_batch)
    hyper["num_crops"] = request.num_crops or task_profiles()["tasks"][request.task]["num_crops"]
    if request.data_dir:
        size_schedule(hyper, dataset_size(request), global_batch)
    base = setup_for(method, hw.gpu, world, hyper)
    flash_missing = software is not None and base.attn == "flash_attention_2" and not software.flash_attn
    if flash_missing:  # recommend only what is installed
        base = replace(base, attn="sdpa")
    supported, reasons = _support_reasons(method, hw, software)
    search_args = (hw, shape, workload, memory_shape or workload, calibration, traces)
    candidates = search(base, *search_args[:4], request, *search_args[4:])
    offload_problem = software.offload_problem if software is not None else None
    # an offload DeepSpeed cannot build here is never recommended (it would fail after the model is built)
    offerable = [c for c in candidates if not (offload_problem and c.layout.offload != "none")]
    chosen = choose(offerable) if supported else None
    fits = chosen is not None
    pick = chosen or candidates[0]  # nothing fits: the plain, checkpointed micro-batch 1 layout
    pick.layout.chosen = fits
    speedup = None
    if supported:
        reasons.insert(0, _fit_reason(method, hw, pick, fits, calibration))
        if fits:
            extra, speedup = _layout_reasons(pick, candidates, hw, host_ram_bytes(request, hw)[1], workload.images)
            reasons.extend(extra + packing_reason(pick, candidates, workload.images))
        elif offload_problem and any(c.layout.fits and c.layout.offload != "none" for c in candidates):
            reasons.append(f"an offloaded optimizer would fit, but it cannot be built here: {offload_problem}")
        if fits and pick.layout.offload != "none" and software is None:
            reasons.append(
                "what-if: assumes DeepSpeed can build its CPU Adam on the target (ninja and a C++ compiler, or "
                "DS_BUILD_CPU_ADAM=1 at install)"
            )
        reasons.extend(_retention_reasons(candidates, chosen, float(hyper["learning_rate"])))
    if flash_missing:
        reasons.append(_flash_gain(base, pick, search_args, request, supported))
    setup = pick.setup
    effective = setup.micro_batch * setup.grad_accum * world
    if setup.zero == 2 and not setup.offload_optimizer:
        reasons.append(
            f"DeepSpeed ZeRO-2 over {world} GPUs ({ZERO_BUCKET_ELEMENTS:.0e}-element buckets, phi3v-finetune's default)"
        )
    elif setup.spec.trains_base and setup.optim == "adamw" and not setup.offload_optimizer:
        reasons.append("one GPU: AdamW with fp32 master weights, no DeepSpeed (16 bytes per trained parameter)")
    if effective != global_batch:
        reasons.append(f"global batch {global_batch} does not split over {world} GPUs: using {effective}")
    reasons.extend(_speed_notes(pick, hw, calibration))
    plan_ = MethodPlan(
        method=method, supported=supported, fits=fits, precision=setup.precision, attn=setup.attn,
        micro_batch=setup.micro_batch, grad_accum=setup.grad_accum, global_batch=effective,
        gradient_checkpointing=setup.gradient_checkpointing, zero_stage=setup.zero, memory=pick.memory,
        checkpoint_towers=setup.checkpoint_towers if setup.gradient_checkpointing else "both",
        capacity_bytes=hw.gpu.memory_bytes, speed=pick.speed, reasons=reasons, hyperparameters=hyper,
        fits_without_checkpointing=any(c.layout.fits and not c.layout.gradient_checkpointing for c in candidates),
        optim=pick.layout.optim, offload=pick.layout.offload, layouts=[c.layout for c in candidates],
        speedup_vs_checkpointing=speedup, host_bytes=pick.layout.host_bytes, setup=setup,
    )  # fmt: skip
    if pick.speed is not None:
        plan_.data_loading = data_loading_for(pick.speed.per_gpu, hw, request, workload)
    if fits:
        plan_.command = command(hw, request.task, plan_, request.model_path, request.data_dir, request.skip_bad)
    if pick.speed is not None and pick.speed.epoch_s is not None:
        plan_.run_s = pick.speed.epoch_s * float(hyper["epochs"])
        if request.price_per_gpu_hour is not None:
            plan_.cost_usd = plan_.run_s / 3600 * request.price_per_gpu_hour * hw.world_size
    return plan_


def _speed_notes(pick: Candidate, hw: Hardware, calibration: Calibration) -> list[str]:
    """Where the speed prediction comes from (or why there is none)."""
    from planner.calibration import fit_speed_constants

    gpu = hw.gpu
    if pick.speed is None:
        return [f"{gpu.key}: peak TFLOP/s or bandwidth unknown: speed not predicted"]
    if gpu.detected:
        return [f"speed is an architecture-level estimate: {gpu.source}"]
    constants, _fitted = fit_speed_constants(calibration, load_shape("phi-3-vision"))
    if gpu.architecture not in constants.matmul_efficiency:
        return [f"speed is an architecture-level estimate: {constants.efficiency_for(gpu.architecture)[1]}"]
    return []


def _refuse_past_the_context(
    request: PlanRequest, workload: SampleShape, longest: SampleShape | None, profile: Any, shape: ModelShape
) -> None:
    """The rule finetune and ``phi3v-convert check`` apply: no sample longer than the model's context is trained."""
    if longest is not None and longest.seq_len > CONTEXT_LENGTH:
        # The error finetune and check raise, with each record's file:line (imported here: phi3v_core.data loads
        # torch, and a plan without --data must not)
        from phi3v_core.data.seqlen import too_long_error

        too_long = [
            f"record {sample.record_id!r} ({sample.where}): {w.seq_len} tokens ({w.image_tokens} image)"
            for sample in profile.samples
            if (w := sample.sample_shape(shape, profile.num_crops)).seq_len > CONTEXT_LENGTH
        ]
        raise too_long_error(f"jsonl:{request.data_dir}", too_long, CONTEXT_LENGTH)
    if workload.seq_len > CONTEXT_LENGTH:
        given = f"--seq-len {request.seq_len}" if request.seq_len else f"{workload.seq_len:,} tokens per sample"
        raise ConfigError(
            f"{given} is more than the model's context ({CONTEXT_LENGTH:,} tokens); no run can train such samples: "
            "lower --seq-len, --text-tokens, --images or --num-crops"
        )


def _why(methods: list[MethodPlan], request: PlanRequest, images: int) -> tuple[str | None, list[str]]:
    """The recommended method (the recipe's order among those that fit) and why."""
    fitting = {m.method: m for m in methods if m.fits}
    recommended = next((name for name in method_preference() if name in fitting), None)
    if recommended is None:
        return None, ["nothing fits: use more GPUs (ZeRO-2 shards full fine-tuning), fewer crops, or a larger GPU"]
    best = fitting[recommended]
    why = [why_method(recommended, [m.method for m in methods])]
    lora = fitting.get("lora")
    if recommended == "full" and lora and lora.speed and best.speed and lora.speed.samples_per_s > best.speed.samples_per_s:
        ratio = lora.speed.samples_per_s / best.speed.samples_per_s
        times = f" ({format_duration(lora.run_s)} vs {format_duration(best.run_s)})" if lora.run_s and best.run_s else ""
        host = f", without full's {best.host_bytes / GIB:.0f} GiB of host RAM for its offloaded optimizer" if best.host_bytes else ""
        why.append(f"full ranks first for its published ANLS, not for speed: LoRA also fits and is {ratio:.1f}x faster"
                   f"{times}{host}, for ~1 point less ANLS (phi3v-plan --method lora plans it)")
    if best.speed and request.dataset_size:
        why.append(
            f"expected {best.speed.samples_per_s * max(images, 1):.1f} {THROUGHPUT_UNIT} ({best.speed.samples_per_s:.1f} "
            f"samples/s) → {format_duration(best.speed.epoch_s)} per epoch of "
            f"{request.dataset_size:,} samples"
        )
    if best.run_s is not None:
        source = (
            ("from --data" if request.data_dir else "given")
            if request.dataset_size
            else task_profiles()["tasks"][request.task]["dataset"]["source"].split(";")[0]
        )
        cost = (
            f", about ${best.cost_usd:,.0f} at ${request.price_per_gpu_hour:g} per GPU-hour (--price-per-gpu-hour)"
            if best.cost_usd
            else ""
        )
        why.append(
            f"predicted {format_duration(best.run_s)} for {plural(float(best.hyperparameters['epochs']), 'epoch')} of "
            f"{dataset_size(request):,} samples ({source}){cost}"
        )
    return recommended, why


def _torch_notes(detection: Detection, software: Software) -> list[str]:
    """A warning when this machine's torch cannot use the detected GPUs (the commands would be refused)."""
    problem = torch_gpu_problem(
        detection.count, detection.driver, detection.cuda_driver, software.torch_cuda, cuda_available=None
    )
    return [f"phi3v-finetune will refuse until this is fixed: {problem}"] if problem else []


def _traces_for(request: PlanRequest, method: str, hw: Hardware, workload: SampleShape) -> dict[bool, dict[str, Any]]:
    """MemTracker traces of the method's step with checkpointing on and off (``--trace``)."""
    from planner.trace import trace_activations

    global_batch = request.global_batch or task_profiles()["common"]["global_batch"]
    setup = setup_for(method, hw.gpu, hw.world_size, hyperparameters(request.task, method, global_batch))
    return {gc: trace_activations(request.model, replace(setup, gradient_checkpointing=gc), workload) for gc in (True, False)}


def plan(
    request: PlanRequest,
    nvml: ModuleType | Any | None = None,
    detection: Detection | None = None,
    calibration: Calibration | None = None,
    software: Software | None = None,
) -> Plan:
    """Plan fine-tuning for the requested or detected hardware.

    Args:
        request: What to plan for.
        nvml: NVML module to detect with (tests pass a fake); ignored when ``request.gpu`` is set.
        detection: A ready detection result (skips NVML).
        calibration: Calibration to use (default: :func:`planner.calibration.load_calibration`).
        software: What is installed on the detected machine (default: :meth:`Software.detect`); ignored for
            what-if hardware (``request.gpu``), whose plan states its assumptions instead.

    Raises:
        ConfigError: Invalid request, or no GPU detected and none named.
    """
    request = request.validate()  # the stated card is resolved here, once
    asked = request  # --data sizes num_crops and the batch per machine: --deadline re-plans from what was asked
    if detection is None and not request.states_gpu:
        detection = detect(nvml)
    calibration = calibration or load_calibration(request.reference_dir)
    hw, notes = _hardware(request, detection)
    if request.states_gpu:
        software = None
    else:
        software = software or Software.detect()
        assert detection is not None
        notes.extend(_torch_notes(detection, software))
    if software is None and supports_flash_attention(hw.gpu.compute_capability):
        notes.append(
            "what-if hardware: the commands assume flash-attn is installed there (pip install flash-attn "
            "--no-build-isolation); without it, replace --use_flash_attention by --attn sdpa (the same predicted "
            "memory and speed unpacked; packed, sdpa computes attention over whole rows)"
        )
    shape = load_shape(request.model)
    workload = _sample_shape(request, shape)
    context, memory_shape, profile = None, None, None
    if request.data_dir:  # speed for its mean sample, memory for a micro-batch of its largest, its size as the epoch
        context, request = read_data(request, shape, hw)
        profile, memory_shape, workload = context.profile, context.memory_shape, context.profile.mean_shape
    _refuse_past_the_context(request, workload, memory_shape, profile, shape)
    trace_info: dict[str, Any] | None = {} if request.use_trace else None
    methods = []
    for method in request.methods:
        traces = None
        if trace_info is not None:
            traces = _traces_for(request, method, hw, workload)
            trace_info[method] = {k: v for k, v in traces[True].items() if k not in ("peak", "dynamic_snapshot")}
            trace_info[f"{method} (no checkpointing)"] = {
                k: v for k, v in traces[False].items() if k not in ("peak", "dynamic_snapshot")
            }
        methods.append(
            _plan_method(method, hw, shape, workload, request, calibration, traces, memory_shape, software)
        )
    recommended, why = _why(methods, request, workload.images)
    if hw.gpu.detected:
        notes.append(f"GPU not in the table: {hw.gpu.source}")
    if request.task == "ucf101" and not request.data_dir:
        notes.append("ucf101 trains from converted frames: add --data_dir (the output of phi3v-convert) to the command")
    deadline = None
    if request.deadline_hours is not None:
        deadline = meet_deadline(asked, lambda r: plan(r, detection=detection, calibration=calibration, software=software))
    data = None
    if context is not None:
        data = data_summary(context, shape, hw, methods, recommended, calibration, dataset_size(request))
    best = next((m for m in methods if m.method == recommended), None)
    return Plan(
        request=request, data=data, hardware=hw, shape=shape, workload=workload, methods=methods,
        recommended=recommended, why=why, notes=notes, azure=azure_summary(hw, best), trace=trace_info,
        headroom_fraction=calibration.overheads.headroom_fraction, deadline=deadline,
    )  # fmt: skip


def survey(
    request: PlanRequest, gpus: tuple[str, ...] | None = None, calibration: Calibration | None = None
) -> list[Plan]:
    """Plans for several GPUs (what-if table): each GPU key of ``gpus`` (default :data:`COMMON_GPUS`).

    With ``cloud="azure"`` and no GPUs given, one plan per Azure SKU (8 GPUs per VM).
    """
    calibration = calibration or load_calibration(request.reference_dir)
    if gpus is None:
        gpus = tuple(s.gpu for s in azure_skus()) if request.cloud == "azure" else COMMON_GPUS
    return [plan(replace(request, gpu=key, resolved_gpu=None), calibration=calibration) for key in gpus]
