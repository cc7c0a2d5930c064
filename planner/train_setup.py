"""How one training step runs on each GPU, as the planner models it (:class:`TrainSetup`), and the one map from what
runs (:class:`phi3v_core.workload.Workload`, a ``BenchConfig`` or a ``TrainConfig``) onto it
(:meth:`TrainSetup.from_workload`). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from phi3v_core.constants import ATTN_NAMES, ZERO_BUCKET_ELEMENTS
from phi3v_core.errors import raise_all
from phi3v_core.methods import METHOD_NAMES, Method, get_method
from phi3v_core.workload import Workload
from planner.logits import LOGITS_MODES

if TYPE_CHECKING:
    from phi3v_core.training.config import TrainConfig

__all__ = ["ATTENTIONS", "DTYPE_BYTES", "METHODS", "TrainSetup", "with_option"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = METHOD_NAMES
ATTENTIONS = ATTN_NAMES


@dataclass(frozen=True)
class TrainSetup:
    """How the step runs on each GPU.

    Attributes:
        method: A registered method (:data:`phi3v_core.methods.METHOD_NAMES`).
        precision: Activation/compute dtype: ``bf16``, ``fp16`` (AMP) or ``fp32``.
        weight_dtype: dtype the (frozen) weights are stored in; None means ``precision``. The recipe's "no flash
            attention" path loads fp32 weights and trains with fp16 AMP.
        attn: ``flash_attention_2``, ``sdpa`` (memory-efficient/flash kernels: no S² buffers) or ``eager``.
        gradient_checkpointing: Recompute each decoder/CLIP layer in backward (the recipe's default).
        checkpoint_towers: Where checkpointing applies when on: ``both``, ``llm`` or ``vision`` (``tower_model``).
        freeze_llm: The language model is frozen (``--freeze_llm``): only the image path trains.
        micro_batch: Samples per GPU per forward.
        grad_accum: Micro-steps per optimizer step (>1 keeps gradients alive through the forward).
        world_size: Data-parallel ranks.
        zero_stage: 2 = DeepSpeed ZeRO-2 (the recipe's full fine-tuning), 0 = plain DDP / single process.
        reduce_bucket: DeepSpeed ``reduce_bucket_size`` (elements).
        allgather_bucket: DeepSpeed ``allgather_bucket_size`` (elements).
        overlap_comm: DeepSpeed ``overlap_comm`` (4.5× bucket footprint per HF's DeepSpeed docs).
        lora_rank: LoRA ``r``.
        lora_lm_head: LoRA on ``lm_head``.
        lora_vision: LoRA on CLIP and the projector (not the recipe's ``--freeze_vision_model``).
        optimizer_foreach: torch AdamW's multi-tensor path (default on CUDA): one state-sized temporary.
        logits_retained: The caller keeps the fp32 logits through backward (HF Trainer drops them).
        logits: ``supervised``: ``lm_head`` and loss at labelled positions only; ``full``: everywhere (the recipe).
        optim: ``adamw`` or ``adamw_8bit`` (bitsandbytes: m and v in one byte each plus an fp32 absmax per
            256-element block; the paged variant holds the same bytes).
        offload_optimizer: DeepSpeed ZeRO-Offload: fp32 master weights, fp32 gradients and Adam states in host
            memory (full/frozen_vision under ZeRO-2); the GPU keeps the 16-bit weights and gradients.
    """

    method: str = "full"
    precision: str = "bf16"
    weight_dtype: str | None = None
    attn: str = "flash_attention_2"
    gradient_checkpointing: bool = True
    checkpoint_towers: str = "both"
    freeze_llm: bool = False
    micro_batch: int = 1
    grad_accum: int = 1
    world_size: int = 1
    zero_stage: int | None = None
    reduce_bucket: float = 5e8
    allgather_bucket: float = 5e8
    overlap_comm: bool = True
    lora_rank: int = 64
    lora_lm_head: bool = True
    lora_vision: bool = True
    optimizer_foreach: bool = True
    logits_retained: bool = False
    logits: str = "supervised"
    optim: str = "adamw"
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.precision not in DTYPE_BYTES:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.weight_dtype is not None and self.weight_dtype not in DTYPE_BYTES:
            problems.append(f"weight_dtype {self.weight_dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.attn not in ATTENTIONS:
            problems.append(f"attn {self.attn!r} is not one of {', '.join(ATTENTIONS)}")
        if self.micro_batch < 1 or self.grad_accum < 1 or self.world_size < 1:
            problems.append("micro_batch, grad_accum and world_size must be >= 1")
        if self.zero_stage not in (None, 0, 2):
            problems.append(f"zero_stage={self.zero_stage} is not supported (0 or 2)")
        if self.logits not in LOGITS_MODES:
            problems.append(f"logits {self.logits!r} is not one of {', '.join(LOGITS_MODES)}")
        if self.attn == "flash_attention_2" and self.precision == "fp32":
            problems.append("flash_attention_2 needs bf16 or fp16")
        if self.optim not in ("adamw", "adamw_8bit"):
            problems.append(f"optim {self.optim!r} is not one of adamw, adamw_8bit")
        if self.offload_optimizer and (self.optim != "adamw" or not (self.method in METHODS and self.spec.trains_base)):
            problems.append("offload_optimizer is ZeRO-Offload of AdamW for full/frozen_vision")
        if self.checkpoint_towers not in ("both", "llm", "vision"):
            problems.append(f"checkpoint_towers {self.checkpoint_towers!r} is not one of both, llm, vision")
        if self.freeze_llm and self.method in METHODS and not self.spec.trained_towers(not self.lora_vision, True):
            problems.append(f"freeze_llm with method {self.method!r} trains nothing (the image path is frozen too)")
        raise_all(problems)

    @classmethod
    def from_workload(
        cls,
        work: Workload | TrainConfig,
        *,
        world_size: int = 1,
        grad_accum: int | None = None,
        zero2: bool | None = None,
        cuda: bool = True,
        **knobs: Any,
    ) -> TrainSetup:
        """How ``phi3v-finetune`` runs ``work`` on each of ``world_size`` processes: the one map from what runs to the
        planner's step.

        ``work`` is a :class:`phi3v_core.workload.Workload` (a ``BenchConfig`` is one) or a ``TrainConfig``: they
        name these fields alike. Its method, precision, attention, checkpointing (and where), frozen LLM and
        micro-batch are taken as they are, its optimizer and offload through :func:`with_option`. What it does not
        say is phi3v-finetune's: DeepSpeed ZeRO-2 for full/frozen_vision on more than one process, fp32 master
        weights without it (DeepSpeed casts them to 16-bit; LoRA bases are 16-bit), its ZeRO bucket sizes.

        Args:
            work: What runs.
            world_size: Data-parallel processes.
            grad_accum: Micro-steps per optimizer step (None: ``global_batch // (micro_batch × world_size)``).
            zero2: DeepSpeed ZeRO-2 on or off (None: the default rule; a ``TrainConfig`` says so by
                ``uses_deepspeed``).
            cuda: The step runs on CUDA (torch's AdamW takes the multi-tensor path only for CUDA tensors).
            **knobs: Planner fields a workload does not carry (``lora_rank``, ``lora_lm_head``, ``lora_vision``,
                the buckets, ``logits``).
        """
        spec = get_method(work.method)
        zero2 = spec.supports_deepspeed and world_size > 1 if zero2 is None else zero2
        knobs = {"reduce_bucket": ZERO_BUCKET_ELEMENTS, "allgather_bucket": ZERO_BUCKET_ELEMENTS, **knobs}
        base = cls(
            method=work.method, precision=work.precision, attn=work.attn,
            weight_dtype="fp32" if spec.trains_base and not zero2 else None,
            gradient_checkpointing=work.gradient_checkpointing, checkpoint_towers=work.checkpoint_towers,
            freeze_llm=work.freeze_llm, micro_batch=work.micro_batch,
            grad_accum=grad_accum or max(1, work.global_batch // (work.micro_batch * world_size)),
            world_size=world_size, zero_stage=2 if zero2 else 0, optimizer_foreach=cuda, **knobs,
        )  # fmt: skip
        return with_option(base, work.optim, work.offload)

    @property
    def spec(self) -> Method:
        """The registry entry of ``method`` (what trains, how the base is stored, the adapter's terms)."""
        return get_method(self.method)

    @property
    def zero(self) -> int:
        """Effective ZeRO stage: the recipe uses ZeRO-2 for full/frozen fine-tuning and plain DDP for LoRA/QLoRA."""
        if self.offload_optimizer:
            return 2  # the offload is DeepSpeed ZeRO-2's
        if self.zero_stage is not None:
            return self.zero_stage
        return 2 if self.spec.trains_base else 0

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element."""
        return DTYPE_BYTES[self.precision]

    @property
    def stored_weight_dtype(self) -> str:
        """dtype of the stored weights (DeepSpeed casts full fine-tuning weights to the compute dtype)."""
        if self.zero == 2 and self.spec.trains_base and self.precision != "fp32":
            return self.precision
        return self.weight_dtype or self.precision


def with_option(base: TrainSetup, optim: str, offload: str) -> TrainSetup:
    """``base`` with an optimizer/offload option (and the weight storage phi3v-finetune uses with it).

    ``optim`` is phi3v-finetune's name; the memory model knows ``adamw`` and ``adamw_8bit`` plus a weight dtype.
    """
    if offload == "optimizer":
        return replace(base, offload_optimizer=True, zero_stage=2, weight_dtype=base.precision)
    if optim == "adamw_8bit_fp32_master":
        return replace(base, optim="adamw_8bit", weight_dtype="fp32")  # fp32 weights and gradients, 8-bit m, v
    if optim == "adamw_8bit" and base.spec.trains_base:
        # bf16 weights with no fp32 master (TrainConfig.sixteen_bit_weights); fp16 keeps fp32 weights
        weights = base.precision if base.precision == "bf16" else "fp32"
        return replace(base, optim=optim, weight_dtype=weights, zero_stage=base.zero_stage)
    return replace(base, optim=optim)
