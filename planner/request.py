"""What ``phi3v-plan`` is asked and what it answers: the request, the machine, one method's plan, the whole plan.

Also the task profiles (workload and hyper-parameters per task and method) read from the recipe's data file
(:func:`phi3v_core.constants.load_recipe`). Plain dataclasses; :mod:`planner.recommend` fills them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from phi3v_core.constants import MAX_NUM_CROPS, load_recipe
from phi3v_core.errors import ConfigError, raise_all
from phi3v_core.methods import METHOD_NAMES, get_method
from planner.dataload import DataLoading
from planner.estimate import SampleShape
from planner.hardware import (
    AzureSku,
    GpuSpec,
    custom_gpu,
    find_gpu,
)
from planner.memory_types import GIB, MemoryEstimate
from planner.shapes import ModelShape
from planner.speed import Interconnect, SpeedPrediction
from planner.train_setup import TrainSetup

__all__ = ["COMMON_GPUS", "DEFAULT_INTER_NODE_GBIT", "Hardware", "Layout", "MethodPlan", "Plan", "PlanRequest", "task_profiles"]

#: GPUs shown when nothing is detected and no ``--gpu`` is given.
COMMON_GPUS = ("T4", "V100-32GB", "A10", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-SXM", "H200")
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
    """The recipe's published preset for ``task``/``method``, else the CookBook scripts' defaults (labelled so).

    A method outside the recipe takes the presets of the one its registry entry names (``hyperparameters_from``).
    """
    recipe = load_recipe()
    spec = get_method(method)
    preset = recipe.presets.get(f"{task}-{spec.preset_name}")
    values = preset.values if preset is not None else recipe.recipe_defaults
    epochs = float(values["num_train_epochs"])
    out: dict[str, Any] = {
        "learning_rate": values["learning_rate"],
        "epochs": int(epochs) if epochs.is_integer() else epochs,
    }
    if get_method(method).uses_lora:
        out["lora_rank"] = values["lora_rank"]
        out["lora_alpha"] = round(values["lora_rank"] * values["lora_alpha_ratio"])
    out["source"] = (
        f"{preset.source}: {preset.published}"
        if preset is not None
        else f"not published for {task}: the scripts' defaults (the CookBook scripts' argparse)"
    )
    if spec.preset_name != method:
        out["source"] = f"{method} is {spec.recipe_label}: {spec.preset_name}'s settings; " + out["source"]
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
        host_ram_gib: Host memory per node (checks an offloaded optimizer fits; None: this machine's when the GPU
            is detected, else unchecked and stated).
        cpus_per_node: CPU cores per node for the data loader (None: this machine's when the GPU is detected, the
            Azure SKU's vCPUs, else unknown and stated).
        processor_rate: Processor samples/s on one core of the target's CPU (None: the stored measurement).
        model_path: Checkpoint folder the launch command trains (``--model_name_or_path``); None prints a shell
            placeholder that stops with a clear message unless ``$PHI3V_MODEL`` is set.
        resolved_gpu: The stated card as :meth:`validate` resolved it (the one lookup of ``--gpu`` /
            ``--gpu_memory_gib``); set by :meth:`validate`, not by hand: a copy for another card passes
            ``resolved_gpu=None`` (as :func:`planner.recommend.survey` does).
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
    skip_bad: bool = False
    deadline_hours: float | None = None
    host_ram_gib: float | None = None
    cpus_per_node: int | None = None
    processor_rate: float | None = None
    price_per_gpu_hour: float | None = None
    gpu_memory_gib: float | None = None
    gpu_tflops: float | None = None
    gpu_bandwidth_gbs: float | None = None
    resolved_gpu: GpuSpec | None = None

    @property
    def states_gpu(self) -> bool:
        """The card is stated (``--gpu`` or ``--gpu_memory_gib``), not detected."""
        return bool(self.gpu) or self.gpu_memory_gib is not None

    def gpu_spec(self) -> GpuSpec:
        """The stated card, as :meth:`validate` resolved it (a request that was not validated resolves it now)."""
        return self.resolved_gpu or self._look_up_gpu()

    def _look_up_gpu(self) -> GpuSpec:
        """The table's row for ``--gpu``, or one built from ``--gpu_memory_gib`` (``--tflops``, ``--bandwidth``) for a
        card the table lacks."""
        if self.gpu_memory_gib is not None:
            return custom_gpu(self.gpu, self.gpu_memory_gib, self.gpu_tflops, self.gpu_bandwidth_gbs)
        assert self.gpu is not None, "gpu_spec() needs --gpu or --gpu_memory_gib"
        return find_gpu(self.gpu)

    def _scale_problems(self) -> list[str]:
        """GPUs per node within real nodes, and enough samples and batch for every GPU (checked together)."""
        problems = []
        if self.count is not None and self.count > MAX_GPUS_PER_NODE:
            problems.append(
                f"--gpus {self.count} GPUs in one node: the largest nodes hold {MAX_GPUS_PER_NODE} (NVIDIA DGX-2 / "
                f"HGX-2); spread them over nodes, e.g. --gpus 8 --nodes {-(-self.count // 8)}"
            )
        gpus = (self.count or 1) * max(self.nodes, 1)
        if self.dataset_size is not None and 1 <= self.dataset_size < gpus:
            problems.append(
                f"--dataset-size {self.dataset_size} is smaller than the {gpus} GPUs (--gpus x --nodes): every GPU "
                "needs at least one sample per step; use fewer GPUs"
            )
        if self.global_batch is not None and 1 <= self.global_batch < gpus:
            problems.append(
                f"--batch_size {self.global_batch} is smaller than the {gpus} GPUs (--gpus x --nodes): every GPU "
                "needs at least one sample per step; raise --batch-size or use fewer GPUs"
            )
        return problems

    def validate(self) -> PlanRequest:
        """Check every field at once, and resolve the stated card (once: a validated request keeps it).

        Returns:
            This request with :attr:`resolved_gpu` set where a card is stated.

        Raises:
            ConfigError: Listing every problem.
        """
        problems = []
        tasks = task_profiles()["tasks"]
        if self.task not in tasks:
            problems.append(f"--task {self.task!r} is not one of {', '.join(tasks)}")
        if self.count is not None and self.count < 1:
            problems.append(f"--gpus {self.count} must be >= 1")
        if self.nodes < 1:
            problems.append(f"--nodes {self.nodes} must be >= 1")
        problems += self._scale_problems()
        if self.num_crops is not None and not 1 <= self.num_crops <= MAX_NUM_CROPS:
            problems.append(
                f"--num_crops {self.num_crops} must be between 1 and {MAX_NUM_CROPS} "
                f"(the recipe asserts <= {MAX_NUM_CROPS})"
            )
        if self.dataset_size is not None and self.dataset_size < 1:
            problems.append(f"--dataset-size {self.dataset_size} must be >= 1")
        if self.global_batch is not None and self.global_batch < 1:
            problems.append(f"--batch_size {self.global_batch} must be >= 1")
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
        if self.host_ram_gib is not None and self.host_ram_gib <= 0:
            problems.append(f"--host_ram_gib {self.host_ram_gib:g} must be positive")
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            problems.append(f"--cpus_per_node {self.cpus_per_node} must be >= 1")
        if self.processor_rate is not None and not 0 < self.processor_rate < float("inf"):
            problems.append(f"--processor_rate {self.processor_rate:g} must be a positive number (samples/s per core)")
        if self.max_micro_batch < 1:
            problems.append("--max-micro-batch must be >= 1")
        if self.image_size is not None and min(self.image_size) < 1:
            problems.append(f"--image-size {self.image_size[0]}x{self.image_size[1]} must be positive")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            # here, before the data reader (and torch) is imported: a wrong path answers at once
            problems.append(f"--data {self.data_dir}: not a folder; pass a folder holding <name>_train.jsonl and images/")
        if (self.gpu_tflops or self.gpu_bandwidth_gbs) and self.gpu_memory_gib is None:
            problems.append("--tflops and --bandwidth describe a card together with --gpu_memory_gib; add it")
        card = self.resolved_gpu
        if card is None and self.states_gpu:
            try:
                card = self._look_up_gpu()
            except ConfigError as exc:
                problems.append(str(exc))
        raise_all(problems)
        return self if card is self.resolved_gpu else replace(self, resolved_gpu=card)


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
class Layout:
    """One way to run a method: batch split, checkpointing, optimizer and offload, with what it is predicted to cost.

    Attributes:
        micro_batch: Samples per GPU per forward.
        grad_accum: Micro-batches per optimizer step.
        gradient_checkpointing: Recompute each layer in backward.
        optim: ``phi3v-finetune --optim``: ``adamw``, ``adamw_8bit`` (bf16 weights) or ``adamw_8bit_fp32_master``.
        offload: ``none`` or ``optimizer`` (DeepSpeed ZeRO-Offload).
        reserved_bytes: Predicted reserved peak per GPU.
        fits: Under the headroom rule (and, with offload, within the known host memory).
        samples_per_s: Predicted global throughput (None when the GPU's peak is unknown).
        host_bytes: Host memory per node the offloaded optimizer holds (0 without offload).
        chosen: The layout the plan recommends for this method.
        update_retention: Predicted share of trained weights one step at the recipe's learning rate changes
            (:mod:`phi3v_core.retention`); a layout under 50 % is never recommended.
        checkpoint_towers: Where checkpointing applies when on: ``both`` or ``llm`` (the CLIP tower keeps its
            activations: less recompute, more memory).
        packing: ``--packing``: :meth:`planner.packing.PackingPrediction.to_dict` (None: padded micro-batches).
    """

    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    optim: str
    offload: str
    reserved_bytes: float
    fits: bool
    samples_per_s: float | None
    host_bytes: float = 0.0
    chosen: bool = False
    update_retention: float = 1.0
    checkpoint_towers: str = "both"
    packing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "gradient_checkpointing": self.gradient_checkpointing,
            "checkpoint_towers": self.checkpoint_towers,
            "optim": self.optim,
            "offload": self.offload,
            "predicted_reserved_gib": round(self.reserved_bytes / GIB, 3),
            "fits": self.fits,
            "samples_per_s": self.samples_per_s,
            "host_gib": round(self.host_bytes / GIB, 2),
            "update_retention": round(self.update_retention, 4),
            "chosen": self.chosen,
            "packing": self.packing,
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
    optim: str = "adamw"
    offload: str = "none"
    layouts: list[Layout] = field(default_factory=list)
    speedup_vs_checkpointing: float | None = None
    host_bytes: float = 0.0
    #: The chosen layout's setup (micro-batch 1, checkpointed, plain AdamW when nothing fits); not in ``--json``.
    setup: TrainSetup | None = field(default=None, repr=False)
    data_loading: DataLoading | None = None
    checkpoint_towers: str = "both"

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
            "checkpoint_towers": self.checkpoint_towers,
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
            "optim": self.optim,
            "offload": self.offload,
            "host_gib": round(self.host_bytes / GIB, 2),
            "update_retention": next(
                (round(lay.update_retention, 4) for lay in self.layouts if lay.chosen), None
            ),
            "speedup_vs_checkpointing": self.speedup_vs_checkpointing,
            "packing": next((lay.packing for lay in self.layouts if lay.chosen), None),
            "layouts": [layout.to_dict() for layout in self.layouts],
            "data_loading": self.data_loading.to_dict() if self.data_loading else None,
        }


@dataclass
class Plan:
    """Everything the planner concluded for one piece of hardware."""

    request: PlanRequest
    hardware: Hardware
    shape: ModelShape
    workload: SampleShape
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
        del request["resolved_gpu"]  # the card is "hardware"'s
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

