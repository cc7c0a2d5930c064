"""What a measured run trains, as one typed value that training, ``phi3v-bench`` and ``phi3v-plan --validate`` share.

Light on purpose (no torch): ``phi3v-bench`` checks its flags against it before anything heavy is imported.
:func:`phi3v_core.training.workload.to_train_config` maps it onto the training core's ``TrainConfig`` (the one map),
and :func:`~phi3v_core.training.workload.build_workload` builds its synthetic data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi3v_core.constants import (
    ATTN_NAMES,
    DEFAULT_ATTN,
    MAX_NUM_CROPS,
    MODEL_PRESET_NAMES,
    OFFLOAD_NAMES,
    OPTIM_NAMES,
    PRECISION_NAMES,
    SeqProfile,
    load_recipe,
)
from phi3v_core.kernels import KERNEL_NAMES
from phi3v_core.methods import METHOD_NAMES

__all__ = ["Workload"]


@dataclass(frozen=True)
class Workload:
    """What a measured run trains, declared once: ``phi3v-bench``'s :class:`~bench.config.BenchConfig` adds the
    GPUs and the protocol to it, and ``phi3v-plan --validate`` times one directly; :func:`to_train_config` maps it
    onto the training core's ``TrainConfig``.

    Attributes:
        method: Fine-tuning method (a :data:`phi3v_core.methods.METHOD_NAMES` name).
        attn: Attention kernel for the text and vision towers.
        precision: ``bf16``/``fp16`` mixed precision or plain ``fp32``.
        model: ``tiny``, ``phi-3.5-vision``, ``phi-3-vision`` or a checkpoint folder holding ``config.json``.
        num_crops: HD crops per image (1..16); the vision tower always sees ``num_crops + 1`` crops.
        seq_profile: Synthetic sample shape, a key of the recipe's sequence profiles (:attr:`profile`).
        global_batch: Global effective batch per optimizer step, over all GPUs (the recipe's ``--batch_size``).
        micro_batch: Samples per GPU per forward/backward; gradient accumulation fills up to ``global_batch``.
        seed: Random seed for the synthetic data and the weights (42, ``TrainingArguments``' default, as every
            command's ``--seed``).
        gradient_checkpointing: Recompute activations in backward (the recipe always turns it on).
        optim: ``phi3v-finetune --optim`` name (``adamw``, ``adamw_8bit``, ``adamw_8bit_fp32_master``, ...).
        offload: ``none`` or ``optimizer`` (DeepSpeed ZeRO-Offload).
        learning_rate: Peak learning rate; ``None`` = the recipe's for the profile's task and the method. It does
            not change the step time, but decides how many weights a step changes.
        checkpoint_towers: Where checkpointing applies when on: ``both``, ``llm`` (decoder) or ``vision`` (CLIP).
        freeze_llm: Train the image path with the language model frozen.
        kernels: ``none`` or ``liger`` (Liger's Triton kernels in the decoder; GPU only).
        compile: ``torch.compile`` the model; the first warmup step compiles.
        vision_lr: Learning rate of the CLIP tower (None: ``learning_rate``).
        projector_lr: Learning rate of the projector and separators (None: ``learning_rate``).
        packing: Pack each micro-batch's samples into rows (``phi3v-finetune --packing``): the same losses and
            gradients, less padding.
        pack_tokens: Tokens per packed row; ``None`` = the micro-batch's longest sample.
    """

    method: str = "lora"
    attn: str = DEFAULT_ATTN
    precision: str = "bf16"
    model: str = "tiny"
    num_crops: int = 16
    seq_profile: str = "docvqa"
    global_batch: int = 8
    micro_batch: int = 1
    seed: int = 42
    gradient_checkpointing: bool = True
    optim: str = "adamw"
    offload: str = "none"
    learning_rate: float | None = None
    checkpoint_towers: str = "both"
    freeze_llm: bool = False
    kernels: str = "none"
    compile: bool = False
    vision_lr: float | None = None
    projector_lr: float | None = None
    packing: bool = False
    pack_tokens: int | None = None

    @property
    def profile(self) -> SeqProfile:
        """The recipe's :class:`SeqProfile` named by ``seq_profile``."""
        return load_recipe().profiles[self.seq_profile]

    def problems(self) -> list[str]:
        """Every problem of the workload's fields (empty when valid), each naming the field and the fix: the one rule
        for what runs (:meth:`bench.config.BenchConfig.problems` adds the placement and protocol fields')."""
        problems = [f"{name} {value!r} is not one of {', '.join(allowed)}" for name, value, allowed in (
            ("method", self.method, METHOD_NAMES), ("attn", self.attn, ATTN_NAMES),
            ("precision", self.precision, PRECISION_NAMES), ("seq_profile", self.seq_profile, tuple(load_recipe().profiles)),
            ("optim", self.optim, OPTIM_NAMES), ("offload", self.offload, OFFLOAD_NAMES),
            ("kernels", self.kernels, KERNEL_NAMES), ("checkpoint_towers", self.checkpoint_towers, ("both", "llm", "vision")),
        ) if value not in allowed]  # fmt: skip
        if self.attn == "flash_attention_2" and self.precision == "fp32":
            problems.append("attn flash_attention_2 needs bf16 or fp16 (flash-attn has no fp32 kernels); use --precision bf16")
        problems.extend(_model_problems(self.model))
        for name in ("num_crops", "global_batch", "micro_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.num_crops, int) and self.num_crops > MAX_NUM_CROPS:
            problems.append(f"num_crops must be <= {MAX_NUM_CROPS} (the recipe's limit), got {self.num_crops}")
        for name, example in (("learning_rate", "5e-6"), ("vision_lr", "1e-5"), ("projector_lr", "1e-5")):
            lr = getattr(self, name)
            if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < 1):
                problems.append(f"{name} must be a number in (0, 1) (e.g. {example}), got {lr!r}")
        for name in ("packing", "gradient_checkpointing", "freeze_llm", "compile"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        tokens = self.pack_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            problems.append(f"pack_tokens must be a positive integer, got {tokens!r}")
        elif tokens is not None and self.packing is False:
            problems.append(f"pack_tokens {tokens} sizes packed rows but packing is off; add --packing")
        return problems


def _model_problems(model: str) -> list[str]:
    if not isinstance(model, str) or not model:
        return ["model must be a preset name or a checkpoint folder"]
    if model in MODEL_PRESET_NAMES or (Path(model) / "config.json").is_file():
        return []
    return [f"model {model!r} is neither a preset ({', '.join(MODEL_PRESET_NAMES)}) nor a folder with config.json"]
