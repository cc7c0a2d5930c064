"""``plan(request) -> Plan``: what fits on the hardware, what to run and how fast it will go (no printing).

Decision rules (each shows up as a reason in the plan):

* precision: bf16 only on compute capability ≥ 8.0 (``torch.cuda.is_bf16_supported()`` also says True on V100/T4,
  where bf16 is emulated); otherwise fp16 mixed precision with loss scaling;
* attention: FlashAttention-2 on ≥ 8.0 with 16-bit tensors, else SDPA (its memory-efficient kernel has no S²
  buffers on Volta/Turing either); eager is never recommended;
* QLoRA needs bitsandbytes NF4 kernels (planner.hardware.qlora_unsupported_reason);
* model states as ``phi3v-finetune`` runs them: full/frozen with DeepSpeed ZeRO-2 (5e7-element buckets, the
  training default) when more than one GPU, plain AdamW with fp32 master weights on one GPU; LoRA/QLoRA with DDP;
* micro-batch: the largest power of two that fits and divides the global batch per GPU; gradient checkpointing on
  (``phi3v-finetune`` always checkpoints; the plan says when it would fit without);
* recommended method: the recipe's order, full fine-tuning "whenever possible", else LoRA, else QLoRA, else the
  frozen-vision variant (the Phi-3CookBook fine-tuning guide's accuracy tables).
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from types import ModuleType
from typing import Any

from phi3v_core.constants import MAX_NUM_CROPS, METHOD_NAMES, ZERO_BUCKET_ELEMENTS, load_recipe
from phi3v_core.errors import ConfigError, raise_all
from planner.calibration import Calibration, fit_speed_constants, load_calibration
from planner.estimate import GIB, MemoryEstimate, TrainSetup, Workload, estimate_memory
from planner.hardware import (
    AzureSku,
    Detection,
    GpuSpec,
    azure_skus,
    detect,
    find_gpu,
    qlora_unsupported_reason,
    supports_bf16,
    supports_flash_attention,
)
from planner.shapes import ModelShape, load_shape
from planner.speed import Interconnect, SpeedPrediction, format_duration, predict_speed

__all__ = [
    "COMMON_GPUS", "Hardware", "MethodPlan", "Plan", "PlanRequest", "fits_with_headroom", "plan", "survey",
    "task_profiles", "usable_limit",
]

#: GPUs shown when nothing is detected and no ``--gpu`` is given.
COMMON_GPUS = ("T4", "V100-32GB", "A10", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-SXM", "H200")
#: The recipe's order of preference (quality first; the Phi-3CookBook fine-tuning guide's accuracy tables).
PREFERENCE = ("full", "lora", "qlora", "frozen_vision")
#: Network assumed between nodes when nothing says otherwise (Gbit/s per node).
DEFAULT_INTER_NODE_GBIT = 200.0


def task_profiles() -> dict[str, Any]:
    """Per task: workload shape, training-set size and hyper-parameters per method; plus the common arguments.

    The recipe's facts come from its data file (:func:`phi3v_core.constants.load_recipe`: sequence profiles,
    published presets, fixed ``TrainingArguments``); ``planner/data/recipes.json`` adds only what the planner alone
    needs (training-set sizes). A task × method the recipe publishes no numbers for gets the scripts' defaults.

    Returns:
        ``{"common": {...}, "tasks": {task: {...}}}`` (a fresh copy; callers may change it).
    """
    return copy.deepcopy(_task_profiles())


@cache
def _task_profiles() -> dict[str, Any]:
    recipe = load_recipe()
    planner_only = json.loads(resources.files("planner").joinpath("data/recipes.json").read_text())
    common = {**recipe.training_arguments, "source": recipe.sources["training_arguments"]}
    tasks = {}
    for name, profile in recipe.profiles.items():
        tasks[name] = {
            "dataset": planner_only["datasets"][name],
            "images_per_sample": profile.images_per_sample,
            "image_width": profile.image_width,
            "image_height": profile.image_height,
            "text_tokens": profile.text_tokens,
            "answer_tokens": profile.answer_tokens,
            "num_crops": profile.recommended_num_crops,
            "workload_source": profile.source,
            "methods": {method: _method_hyperparameters(name, method) for method in METHOD_NAMES},
        }
    return {"common": common, "tasks": tasks}


def _method_hyperparameters(task: str, method: str) -> dict[str, Any]:
    """The recipe's published preset for ``task``/``method``, else the CookBook scripts' defaults (labelled so)."""
    recipe = load_recipe()
    preset = recipe.presets.get(f"{task}-{method}")
    values = preset.values if preset is not None else recipe.recipe_defaults
    epochs = float(values["num_train_epochs"])
    out: dict[str, Any] = {
        "learning_rate": values["learning_rate"],
        "epochs": int(epochs) if epochs.is_integer() else epochs,
    }
    if method in ("lora", "qlora"):
        out["lora_rank"] = values["lora_rank"]
        out["lora_alpha"] = round(values["lora_rank"] * values["lora_alpha_ratio"])
    out["source"] = (
        f"{preset.source}: {preset.published}"
        if preset is not None
        else f"not published for {task}: the scripts' defaults (the CookBook scripts' argparse)"
    )
    return out


#: Most GPUs one node holds (NVIDIA DGX-2 / HGX-2: 16; Azure ND and DGX/HGX A100/H100: 8).
MAX_GPUS_PER_NODE = 16


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks.

    Attributes:
        gpu: GPU name (table key or alias); None = detect.
        count: GPUs per node; None = detected count, 8 on Azure, else 1.
        nodes: Nodes.
        task: ``docvqa``, ``hateful_memes``, ``nlvr2`` or ``ucf101`` (workload and hyper-parameters).
        num_crops: HD crops per image; None = the task's (16; UCF-101 4).
        image_size: (width, height) of a typical image; None = the task's.
        images_per_sample: Images per sample; None = the task's.
        text_tokens: Text tokens per sample; None = the task's.
        seq_len: Override the LM sequence length (tokens per sample).
        dataset_size: Samples per epoch (for time per epoch).
        global_batch: Samples per optimizer step; None = 64 (Phi-3CookBook FineTuning_Vision.md).
        model: Model preset or checkpoint folder (shapes only).
        methods: Methods to consider.
        cloud: ``azure`` adds SKU, VM count and vCPU quota.
        inter_node_gbit: Network per node in Gbit/s (multi-node); None = SKU's or 200.
        max_micro_batch: Largest micro-batch to consider.
        use_trace: Replace the closed-form activations by a MemTracker trace of the full model (slow, cached).
        reference_dir: Folder with the published ``speed.csv`` (calibration).
        price_per_gpu_hour: The user's price of one GPU-hour in USD: the only source of costs (no price table is
            shipped; prices differ by region, offer and date).
        deadline_hours: Find the fewest nodes whose predicted run (all epochs) ends within this many hours.
        data_dir: A jsonl data folder: speed for its mean sample, memory for a batch of its longest sample, and
            its size as the epoch (``--data``).
        model_path: Checkpoint folder the launch command trains (``--model_name_or_path``); None prints a shell
            placeholder that stops with a clear message unless ``$PHI3V_MODEL`` is set.
    """

    gpu: str | None = None
    count: int | None = None
    nodes: int = 1
    task: str = "docvqa"
    num_crops: int | None = None
    image_size: tuple[int, int] | None = None
    images_per_sample: int | None = None
    text_tokens: int | None = None
    seq_len: int | None = None
    dataset_size: int | None = None
    global_batch: int | None = None
    model: str = "phi-3.5-vision"
    methods: tuple[str, ...] = METHOD_NAMES
    cloud: str | None = None
    inter_node_gbit: float | None = None
    max_micro_batch: int = 16
    use_trace: bool = False
    reference_dir: str | None = None
    model_path: str | None = None
    data_dir: str | None = None
    deadline_hours: float | None = None
    price_per_gpu_hour: float | None = None

    def _scale_problems(self) -> list[str]:
        """GPUs per node within real nodes, and enough samples and batch for every GPU (checked together)."""
        problems = []
        if self.count is not None and self.count > MAX_GPUS_PER_NODE:
            problems.append(
                f"--count {self.count} GPUs in one node: the largest nodes hold {MAX_GPUS_PER_NODE} (NVIDIA DGX-2 / "
                f"HGX-2); spread them over nodes, e.g. --count 8 --nodes {-(-self.count // 8)}"
            )
        gpus = (self.count or 1) * max(self.nodes, 1)
        if self.dataset_size is not None and 1 <= self.dataset_size < gpus:
            problems.append(
                f"--dataset-size {self.dataset_size} is smaller than the {gpus} GPUs (--count x --nodes): every GPU "
                "needs at least one sample per step; use fewer GPUs"
            )
        if self.global_batch is not None and 1 <= self.global_batch < gpus:
            problems.append(
                f"--batch-size {self.global_batch} is smaller than the {gpus} GPUs (--count x --nodes): every GPU "
                "needs at least one sample per step; raise --batch-size or use fewer GPUs"
            )
        return problems

    def validate(self) -> None:
        """Check every field at once.

        Raises:
            ConfigError: Listing every problem.
        """
        problems = []
        tasks = task_profiles()["tasks"]
        if self.task not in tasks:
            problems.append(f"--task {self.task!r} is not one of {', '.join(tasks)}")
        if self.count is not None and self.count < 1:
            problems.append(f"--count {self.count} must be >= 1")
        if self.nodes < 1:
            problems.append(f"--nodes {self.nodes} must be >= 1")
        problems += self._scale_problems()
        if self.num_crops is not None and not 1 <= self.num_crops <= MAX_NUM_CROPS:
            problems.append(
                f"--num-crops {self.num_crops} must be between 1 and {MAX_NUM_CROPS} "
                f"(the recipe asserts <= {MAX_NUM_CROPS})"
            )
        if self.dataset_size is not None and self.dataset_size < 1:
            problems.append(f"--dataset-size {self.dataset_size} must be >= 1")
        if self.global_batch is not None and self.global_batch < 1:
            problems.append(f"--batch-size {self.global_batch} must be >= 1")
        if self.seq_len is not None and self.seq_len < 1:
            problems.append(f"--seq-len {self.seq_len} must be >= 1")
        if self.images_per_sample is not None and self.images_per_sample < 0:
            problems.append(f"--images {self.images_per_sample} must be >= 0")
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown:
            problems.append(f"--method {', '.join(unknown)} unknown; choose from {', '.join(METHOD_NAMES)}")
        if self.cloud not in (None, "azure"):
            problems.append(f"--cloud {self.cloud!r}: only 'azure' is tabulated")
        if self.inter_node_gbit is not None and self.inter_node_gbit <= 0:
            problems.append("--inter-node-gbit must be positive")
        if self.price_per_gpu_hour is not None and not 0 < self.price_per_gpu_hour < float("inf"):
            problems.append(f"--price-per-gpu-hour {self.price_per_gpu_hour:g} must be a positive number (USD)")
        if self.deadline_hours is not None and self.deadline_hours <= 0:
            problems.append(f"--deadline {self.deadline_hours:g} must be positive (hours)")
        if self.max_micro_batch < 1:
            problems.append("--max-micro-batch must be >= 1")
        if self.image_size is not None and min(self.image_size) < 1:
            problems.append(f"--image-size {self.image_size[0]}x{self.image_size[1]} must be positive")
        if self.gpu is not None:
            try:
                find_gpu(self.gpu)
            except ConfigError as exc:
                problems.append(str(exc))
        raise_all(problems)


@dataclass(frozen=True)
class Hardware:
    """The machine planned for."""

    gpu: GpuSpec
    gpus_per_node: int
    nodes: int
    source: str
    nvlink: bool
    inter_node_gbs: float
    inter_node_source: str
    azure: AzureSku | None = None

    @property
    def world_size(self) -> int:
        """Total GPUs."""
        return self.gpus_per_node * self.nodes

    def interconnect(self) -> Interconnect:
        """Bandwidths for the speed model."""
        intra = (self.gpu.nvlink_gbs if self.nvlink else self.gpu.pcie_gbs) or 32.0
        return Interconnect(
            self.gpus_per_node, self.nodes, intra, self.nvlink, self.inter_node_gbs, self.inter_node_source
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {
            "gpu": self.gpu.to_dict(),
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "source": self.source,
            "nvlink": self.nvlink,
            "inter_node_gbs": self.inter_node_gbs,
            "inter_node_source": self.inter_node_source,
            "azure": self.azure.to_dict() if self.azure else None,
        }


@dataclass
class MethodPlan:
    """The plan for one method."""

    method: str
    supported: bool
    fits: bool
    precision: str
    attn: str
    micro_batch: int
    grad_accum: int
    global_batch: int
    gradient_checkpointing: bool
    zero_stage: int
    memory: MemoryEstimate | None
    capacity_bytes: float
    speed: SpeedPrediction | None
    reasons: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    fits_without_checkpointing: bool = False
    run_s: float | None = None
    cost_usd: float | None = None

    @property
    def peak_gib(self) -> float | None:
        """Predicted reserved peak (what nvidia-smi shows: tensors × allocator overhead + context), GiB, uncapped."""
        return self.memory.reserved / GIB if self.memory else None

    @property
    def margin_gib(self) -> float | None:
        """Usable memory left at the predicted peak, GiB (negative: over the card)."""
        return (self.capacity_bytes - self.memory.reserved) / GIB if self.memory else None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {
            "method": self.method,
            "supported": self.supported,
            "fits": self.fits,
            "precision": self.precision,
            "attention": self.attn,  # the --json key of earlier releases, kept
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_batch,
            "gradient_checkpointing": self.gradient_checkpointing,
            "fits_without_checkpointing": self.fits_without_checkpointing,
            "zero_stage": self.zero_stage,
            "memory": self.memory.to_dict(self.capacity_bytes) if self.memory else None,
            "capacity_gib": round(self.capacity_bytes / GIB, 2),
            "predicted_reserved_gib": round(self.peak_gib, 3) if self.peak_gib is not None else None,
            "margin_gib": round(self.margin_gib, 3) if self.margin_gib is not None else None,
            "speed": self.speed.to_dict() if self.speed else None,
            "reasons": self.reasons,
            "hyperparameters": self.hyperparameters,
            "command": self.command,
            "run_s": self.run_s,
            "cost_usd": self.cost_usd,
        }


@dataclass
class Plan:
    """Everything the planner concluded for one piece of hardware."""

    request: PlanRequest
    hardware: Hardware
    shape: ModelShape
    workload: Workload
    methods: list[MethodPlan]
    recommended: str | None
    why: list[str]
    notes: list[str]
    azure: dict[str, Any] | None = None
    trace: dict[str, Any] | None = None
    headroom_fraction: float = 0.05
    data: dict[str, Any] | None = None
    deadline: dict[str, Any] | None = None

    def method(self, name: str) -> MethodPlan:
        """The plan of one method."""
        return next(m for m in self.methods if m.method == name)

    @property
    def best(self) -> MethodPlan | None:
        """The recommended method's plan."""
        return self.method(self.recommended) if self.recommended else None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        request = asdict(self.request)
        request["methods"] = list(self.request.methods)
        return {
            "request": request,
            "hardware": self.hardware.to_dict(),
            "model": self.shape.to_dict(),
            "parameters": self.shape.param_counts().total,
            "workload": asdict(self.workload),
            "recommended": self.recommended,
            "why": self.why,
            "notes": self.notes,
            "methods": [m.to_dict() for m in self.methods],
            "azure": self.azure,
            "trace": self.trace,
            "headroom_fraction": self.headroom_fraction,
            "data": self.data,
            "deadline": self.deadline,
        }


# -- building blocks -------------------------------------------------------------------------------------------------
def _workload(request: PlanRequest, shape: ModelShape) -> Workload:
    task = task_profiles()["tasks"][request.task]
    images = task["images_per_sample"] if request.images_per_sample is None else request.images_per_sample
    num_crops = request.num_crops or task["num_crops"]
    size = request.image_size or (task["image_width"], task["image_height"])
    text = task["text_tokens"] if request.text_tokens is None else request.text_tokens
    if images == 0:
        workload = Workload(seq_len=text, vision_crops=0, image_tokens=0, images=0, pixel_slots=0)
    else:
        workload = Workload.from_images(
            shape, num_crops, size, images=images, text_tokens=text, answer_tokens=task["answer_tokens"]
        )
    if request.seq_len:
        workload = replace(workload, seq_len=request.seq_len, image_tokens=min(workload.image_tokens, request.seq_len))
    return workload


def _hyperparameters(task: str, method: str, global_batch: int) -> dict[str, Any]:
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


def _setup_for(method: str, gpu: GpuSpec, world: int, hyper: dict[str, Any]) -> TrainSetup:
    cc = gpu.compute_capability
    precision = "bf16" if supports_bf16(cc) else "fp16"
    attn = "flash_attention_2" if supports_flash_attention(cc) else "sdpa"
    full = method in ("full", "frozen_vision")
    zero = 2 if (full and world > 1) else 0
    return TrainSetup(
        method=method,
        precision=precision,
        # phi3v-finetune: DeepSpeed casts to 16-bit; one process keeps fp32 master weights; LoRA bases are 16-bit
        weight_dtype="fp32" if (full and zero == 0) else precision,
        attn=attn,
        gradient_checkpointing=True,
        world_size=world,
        zero_stage=zero,
        reduce_bucket=ZERO_BUCKET_ELEMENTS,
        allgather_bucket=ZERO_BUCKET_ELEMENTS,
        lora_rank=int(hyper.get("lora_rank", 64)),
    )


def _batch_layouts(global_batch: int, world: int, max_micro: int) -> list[tuple[int, int, int]]:
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


def _top_items(memory: MemoryEstimate, n: int = 4) -> str:
    items = sorted(memory.items, key=lambda i: i.bytes, reverse=True)[:n]
    return ", ".join(f"{i.name} {i.gib:.1f}" for i in items)


#: Shell placeholder for the model folder: expands to $PHI3V_MODEL, or stops the command with this message.
MODEL_PLACEHOLDER = '"${PHI3V_MODEL:?set PHI3V_MODEL or pass --model-path: the Phi-3.5-vision-instruct folder}"'


def _command(hw: Hardware, task: str, mp: MethodPlan, model_path: str | None = None) -> str:
    """The exact launch command for ``phi3v-finetune`` (names the model folder, or a placeholder that fails clearly)."""
    hp = mp.hyperparameters
    model = shlex.quote(model_path) if model_path else MODEL_PLACEHOLDER
    args = ["--task", task, "--method", mp.method]
    if mp.precision == "bf16":
        args.append("--bf16")
    else:
        args += ["--precision", mp.precision]
    if mp.attn == "flash_attention_2":
        args.append("--use_flash_attention")
    else:
        args += ["--attn", mp.attn]
    args += ["--batch_size", str(mp.global_batch), "--batch_size_per_gpu", str(mp.micro_batch)]
    args += ["--num_crops", str(hp["num_crops"])]
    args += ["--learning_rate", f"{hp['learning_rate']:g}", "--num_train_epochs", f"{hp['epochs']:g}"]
    if mp.method in ("lora", "qlora"):
        args += ["--lora_rank", str(hp["lora_rank"]), "--lora_alpha_ratio", f"{hp['lora_alpha_ratio']:g}"]
    args += ["--output_dir", f"./output/{task}-{mp.method}"]
    # the placeholder stays unquoted by shlex so the shell expands it (or stops with its message)
    model_arg = f"--model_name_or_path {model}"
    if hw.world_size == 1:
        return " ".join(["phi3v-finetune", model_arg, shlex.join(args)])
    launcher = ["torchrun", f"--nproc_per_node={hw.gpus_per_node}"]
    if hw.nodes > 1:
        launcher += [
            f"--nnodes={hw.nodes}",
            "--node_rank=$NODE_RANK",
            "--master_addr=$MASTER_ADDR",
            "--master_port=29500",
        ]
    # $NODE_RANK / $MASTER_ADDR stay unquoted so the shell expands them on each node
    return " ".join([*launcher, "-m", "phi3v_core.cli.finetune", model_arg, shlex.join(args)])


def _plan_method(
    method: str,
    hw: Hardware,
    shape: ModelShape,
    workload: Workload,
    request: PlanRequest,
    calibration: Calibration,
    trace: dict[str, Any] | None,
    memory_workload: Workload | None = None,
) -> MethodPlan:
    gpu = hw.gpu
    memory_workload = memory_workload or workload
    world = hw.world_size
    global_batch = request.global_batch or task_profiles()["common"]["global_batch"]
    hyper = _hyperparameters(request.task, method, global_batch)
    hyper["num_crops"] = request.num_crops or task_profiles()["tasks"][request.task]["num_crops"]
    base = _setup_for(method, gpu, world, hyper)
    capacity = gpu.memory_bytes
    reasons: list[str] = []
    cc = gpu.compute_capability
    supported = True
    unsupported = qlora_unsupported_reason(cc) if method == "qlora" else None
    if unsupported:
        supported = False
        reasons.append(unsupported)
    if not supports_bf16(cc):
        reasons.append(
            f"{gpu.architecture} has no native bf16 → fp16 mixed precision with loss scaling (~1 point lower accuracy in the recipe)"
        )
    if not supports_flash_attention(cc):
        reasons.append("FlashAttention-2 needs Ampere+ → SDPA (memory-efficient kernel, no S² buffers)")

    layouts = _batch_layouts(global_batch, world, request.max_micro_batch)
    chosen: tuple[TrainSetup, MemoryEstimate] | None = None
    first: tuple[TrainSetup, MemoryEstimate] | None = None
    for micro, accum, _effective in layouts:
        setup = replace(base, micro_batch=micro, grad_accum=accum)
        memory = _estimate(shape, setup, memory_workload, calibration, trace)
        first = first or (setup, memory)
        if fits_with_headroom(memory, capacity, calibration):
            chosen = (setup, memory)
    fits = supported and chosen is not None
    setup, memory = chosen or first  # type: ignore[misc]
    effective = setup.micro_batch * setup.grad_accum * world
    no_gc_fits = fits and fits_with_headroom(
        _estimate(shape, replace(setup, gradient_checkpointing=False), memory_workload, calibration, None),
        capacity,
        calibration,
    )

    limit = usable_limit(capacity, calibration)
    if supported:
        need = memory.reserved / GIB
        if fits:
            reasons.insert(
                0,
                f"fits: predicted reserved peak {need:.1f} of {gpu.memory_gib:g} GiB at micro-batch {setup.micro_batch} "
                f"(limit {limit / GIB:.1f} GiB = {1 - calibration.overheads.headroom_fraction:.0%} of the card, margin "
                f"{(capacity - memory.reserved) / GIB:.1f} GiB; {_top_items(memory)} GiB; peak at {memory.phase})",
            )
            if no_gc_fits:
                reasons.append(
                    "would also fit without gradient checkpointing (~1.3x faster), which phi3v-finetune does not expose"
                )
        else:
            hint = (
                "more GPUs (ZeRO-2 shards the optimizer states)"
                if method in ("full", "frozen_vision")
                else "fewer crops (--num-crops) or a larger GPU"
            )
            reasons.insert(
                0,
                f"does not fit: predicted reserved peak {need:.1f} GiB at micro-batch 1 with checkpointing, above "
                f"{limit / GIB:.1f} GiB ({1 - calibration.overheads.headroom_fraction:.0%} of {gpu.memory_gib:g}) "
                f"({_top_items(memory)} GiB); try {hint}",
            )
    if setup.zero == 2:
        reasons.append(
            f"DeepSpeed ZeRO-2 over {world} GPUs ({ZERO_BUCKET_ELEMENTS:.0e}-element buckets, phi3v-finetune's default)"
        )
    elif method in ("full", "frozen_vision"):
        reasons.append("one GPU: AdamW with fp32 master weights, no DeepSpeed (16 bytes per trained parameter)")
    if effective != global_batch:
        reasons.append(f"global batch {global_batch} does not split over {world} GPUs: using {effective}")

    speed = None
    if fits or supported:
        constants, _fitted = fit_speed_constants(calibration, load_shape("phi-3-vision"))
        speed = predict_speed(shape, workload, setup, gpu, hw.interconnect(), constants, _dataset_size(request))
        if speed is None:
            reasons.append(f"{gpu.key}: peak TFLOP/s or bandwidth unknown: speed not predicted")
        elif gpu.detected:
            reasons.append(f"speed is an architecture-level estimate: {gpu.source}")
        elif gpu.architecture not in constants.matmul_efficiency:
            reasons.append(f"speed is an architecture-level estimate: {constants.efficiency_for(gpu.architecture)[1]}")
    plan = MethodPlan(
        method=method,
        supported=supported,
        fits=fits,
        precision=setup.precision,
        attn=setup.attn,
        micro_batch=setup.micro_batch,
        grad_accum=setup.grad_accum,
        global_batch=effective,
        gradient_checkpointing=setup.gradient_checkpointing,
        zero_stage=setup.zero,
        memory=memory,
        capacity_bytes=capacity,
        speed=speed,
        reasons=reasons,
        hyperparameters=hyper,
        fits_without_checkpointing=no_gc_fits,
    )
    if fits:
        plan.command = _command(hw, request.task, plan, request.model_path)
    if speed is not None and speed.epoch_s is not None:
        plan.run_s = speed.epoch_s * float(hyper["epochs"])
        if request.price_per_gpu_hour is not None:
            plan.cost_usd = plan.run_s / 3600 * request.price_per_gpu_hour * hw.world_size
    return plan


def _dataset_size(request: PlanRequest) -> int:
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


def _estimate(
    shape: ModelShape, setup: TrainSetup, workload: Workload, calibration: Calibration, trace: dict[str, Any] | None
) -> MemoryEstimate:
    memory = estimate_memory(shape, setup, workload, calibration.overheads)
    if trace is None or trace.get("gradient_checkpointing") != setup.gradient_checkpointing:
        return memory
    from planner.trace import apply_trace

    return apply_trace(memory, shape, setup, workload, calibration.overheads, trace)


def _hardware(request: PlanRequest, detection: Detection | None) -> tuple[Hardware, list[str]]:
    notes: list[str] = []
    sku = None
    if request.gpu:
        gpu = find_gpu(request.gpu)
        source = "stated (--gpu)"
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


def _azure_summary(hw: Hardware, best: MethodPlan | None) -> dict[str, Any] | None:
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


def plan(
    request: PlanRequest,
    nvml: ModuleType | Any | None = None,
    detection: Detection | None = None,
    calibration: Calibration | None = None,
) -> Plan:
    """Plan fine-tuning for the requested or detected hardware.

    Args:
        request: What to plan for.
        nvml: NVML module to detect with (tests pass a fake); ignored when ``request.gpu`` is set.
        detection: A ready detection result (skips NVML).
        calibration: Calibration to use (default: :func:`planner.calibration.load_calibration`).

    Raises:
        ConfigError: Invalid request, or no GPU detected and none named.
    """
    request.validate()
    if detection is None and not request.gpu:
        detection = detect(nvml)
    calibration = calibration or load_calibration(request.reference_dir)
    hw, notes = _hardware(request, detection)
    shape = load_shape(request.model)
    workload = _workload(request, shape)
    memory_workload = None
    profile = None
    if request.data_dir:
        from planner.dataprofile import profile_data

        profile = profile_data(request.data_dir, shape, request.num_crops)  # default: the num_crops finetune uses
        num_crops = profile.num_crops
        workload = profile.mean_workload
        memory_workload = profile.samples[profile.longest].workload(shape, num_crops)
        if request.dataset_size is None:
            request = replace(request, dataset_size=len(profile.samples))
        notes.append(
            f"--data: {len(profile.samples):,} samples; speed for the mean sample ({workload.seq_len} tokens), memory "
            f"for a micro-batch of the longest ({memory_workload.seq_len} tokens, {profile.samples[profile.longest].where})"
        )
    trace_info: dict[str, Any] | None = {} if request.use_trace else None
    methods = []
    global_batch = request.global_batch or task_profiles()["common"]["global_batch"]
    for method in request.methods:
        trace = None
        if request.use_trace:
            from planner.trace import trace_activations

            hyper = _hyperparameters(request.task, method, global_batch)
            setup = _setup_for(method, hw.gpu, hw.world_size, hyper)
            trace = trace_activations(request.model, setup, workload)
            trace_info[method] = {k: v for k, v in trace.items() if k not in ("peak", "dynamic_snapshot")}
        methods.append(_plan_method(method, hw, shape, workload, request, calibration, trace, memory_workload))
    recommended = None
    why: list[str] = []
    fitting = [m for m in methods if m.fits]
    for name in PREFERENCE:
        match = next((m for m in fitting if m.method == name), None)
        if match:
            recommended = name
            break
    if recommended:
        best = next(m for m in methods if m.method == recommended)
        why.append(
            {
                "full": "the recipe's first choice: full fine-tuning (best DocVQA ANLS 83.65 vs LoRA 82.46) fits",
                "lora": "full fine-tuning does not fit; LoRA is the recipe's next choice (ANLS 82.46 vs 83.65 full)",
                "qlora": "neither full fine-tuning nor LoRA fits; QLoRA (4-bit base, ANLS 81.85) does",
                "frozen_vision": "only the frozen-vision variant fits (ANLS 79.19 in the recipe)",
            }[recommended]
        )
        lora = next((m for m in fitting if m.method == "lora"), None)
        if (
            recommended == "full"
            and lora
            and lora.speed
            and best.speed
            and lora.speed.samples_per_s > best.speed.samples_per_s
        ):
            ratio = lora.speed.samples_per_s / best.speed.samples_per_s
            why.append(f"LoRA also fits and is {ratio:.1f}x faster for ~1 point less ANLS")
        if best.speed and request.dataset_size:
            why.append(
                f"expected {best.speed.samples_per_s:.1f} samples/s → {format_duration(best.speed.epoch_s)} per epoch of "
                f"{request.dataset_size:,} samples"
            )
    else:
        why.append("nothing fits: use more GPUs (ZeRO-2 shards full fine-tuning), fewer crops, or a larger GPU")
    if hw.gpu.detected:
        notes.append(f"GPU not in the table: {hw.gpu.source}")
    if request.task == "ucf101":
        notes.append("ucf101 trains from converted frames: add --data_dir (the output of phi3v-convert) to the command")
    deadline = None
    best_plan = next((m for m in methods if m.method == recommended), None)
    if request.deadline_hours is not None:
        deadline = _meet_deadline(request, detection, calibration)
    if best_plan is not None and best_plan.run_s is not None:
        dataset = _dataset_size(request)
        source = (
            "given"
            if request.dataset_size
            else task_profiles()["tasks"][request.task]["dataset"]["source"].split(";")[0]
        )
        cost = (
            f", about ${best_plan.cost_usd:,.0f} at ${request.price_per_gpu_hour:g} per GPU-hour (--price-per-gpu-hour)"
            if best_plan.cost_usd
            else ""
        )
        why.append(
            f"predicted {format_duration(best_plan.run_s)} for {best_plan.hyperparameters['epochs']:g} epoch(s) of "
            f"{dataset:,} samples ({source}){cost}"
        )
    data = None
    if profile is not None:
        data = profile.to_dict()
        data["does_not_fit"] = _misfits(profile, shape, hw, methods, recommended, calibration)
    return Plan(
        request=request,
        data=data,
        hardware=hw,
        shape=shape,
        workload=workload,
        methods=methods,
        recommended=recommended,
        why=why,
        notes=notes,
        azure=_azure_summary(hw, next((m for m in methods if m.method == recommended), None)),
        trace=trace_info,
        headroom_fraction=calibration.overheads.headroom_fraction,
        deadline=deadline,
    )


def _meet_deadline(
    request: PlanRequest, detection: Detection | None, calibration: Calibration, max_nodes: int = 64
) -> dict[str, Any]:
    """The fewest nodes (up to ``max_nodes``) whose recommended plan finishes all epochs within the deadline."""
    assert request.deadline_hours is not None
    limit = request.deadline_hours * 3600
    for nodes in range(1, max_nodes + 1):
        trial = plan(replace(request, nodes=nodes, deadline_hours=None), detection=detection, calibration=calibration)
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


def _misfits(
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
        m for name in PREFERENCE for m in methods if m.method == name and m.supported
    ]
    if not candidates or candidates[0].memory is None:
        return {"method": None, "count": 0, "samples": []}
    chosen = candidates[0]
    hw_capacity = chosen.capacity_bytes
    base = replace(_setup_for(chosen.method, hw.gpu, hw.world_size, chosen.hyperparameters), micro_batch=1)
    verdicts: dict[tuple[Any, ...], int | None] = {}
    misfits = []
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
            misfits.append({"sample": sample.where, "seq_len": length, "fits_at_num_crops": verdicts[key]})
    misfits.sort(key=lambda item: -item["seq_len"])  # the longest first
    count, listed = len(misfits), misfits[:20]
    return {"method": chosen.method, "count": count, "samples": listed}


def survey(
    request: PlanRequest, gpus: tuple[str, ...] | None = None, calibration: Calibration | None = None
) -> list[Plan]:
    """Plans for several GPUs (what-if table): each GPU key of ``gpus`` (default :data:`COMMON_GPUS`).

    With ``cloud="azure"`` and no GPUs given, one plan per Azure SKU (8 GPUs per VM).
    """
    calibration = calibration or load_calibration(request.reference_dir)
    if gpus is None:
        gpus = tuple(s.gpu for s in azure_skus()) if request.cloud == "azure" else COMMON_GPUS
    return [plan(replace(request, gpu=key), calibration=calibration) for key in gpus]
