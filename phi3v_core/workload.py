"""What a measured run trains, as one typed value that training, ``phi3v-bench`` and ``phi3v-plan --validate`` share.

Light on purpose (no torch): ``phi3v-bench`` checks its flags against it before anything heavy is imported.
:func:`phi3v_core.training.workload.to_train_config` maps it onto the training core's ``TrainConfig`` (the one map),
and :func:`~phi3v_core.training.workload.build_workload` builds its synthetic data.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3v_core.constants import DEFAULT_ATTN, SeqProfile, load_recipe

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
