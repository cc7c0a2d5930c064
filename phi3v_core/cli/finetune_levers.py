"""``phi3v-finetune``'s kernel, compile and per-tower flags, and the ``TrainConfig`` fields they set.

Their checks are ``TrainConfig``'s (:func:`phi3v_core.training.lever_checks.lever_problems`), so the finetune command, the
bench and the Python API refuse the same settings; ``--kernels liger`` on a CPU is refused there, before any model
is built.
"""

from __future__ import annotations

import argparse
from typing import Any

from phi3v_core.cli.common import bounded_float
from phi3v_core.kernels import KERNEL_NAMES
from phi3v_core.towers import checkpointing_fields

__all__ = ["LEVER_FIELD_FLAGS", "add_lever_flags", "lever_fields"]

#: TrainConfig field → the flag that sets it (to phrase TrainConfig's messages in flag terms).
LEVER_FIELD_FLAGS: dict[str, str] = {
    "kernels": "--kernels",
    "vision_lr": "--vision_lr",
    "projector_lr": "--projector_lr",
    "freeze_llm": "--freeze_llm",
    "checkpoint_towers": "--gradient_checkpointing",
}


def add_lever_flags(parser: argparse.ArgumentParser) -> None:
    """The kernel, compile and per-tower flags (``--gradient_checkpointing`` is in the memory-layout group)."""
    group = parser.add_argument_group("kernels, compiler and per-tower training")
    group.add_argument(
        "--kernels", choices=KERNEL_NAMES, default="none",
        help="liger: Liger's Triton kernels in the decoder (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy; "
        "GPU only, pip install 'phi3v-bench[liger]')",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the model (the first steps compile)")
    group.add_argument(
        "--vision_lr", "--vision-lr", type=bounded_float(0, 1, low_open=True), default=None, metavar="LR",
        help="learning rate of the CLIP tower (default: --learning_rate)",
    )
    group.add_argument(
        "--projector_lr", "--projector-lr", type=bounded_float(0, 1, low_open=True), default=None, metavar="LR",
        help="learning rate of the image projector and separators (default: --learning_rate)",
    )
    group.add_argument(
        "--freeze_llm", "--freeze-llm", action="store_true",
        help="freeze the language model: train the image path only (method full or lora)",
    )


def lever_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields of the parsed lever flags (``--gradient_checkpointing`` included)."""
    enabled, towers = checkpointing_fields(getattr(args, "gradient_checkpointing", "on"))
    return {
        "gradient_checkpointing": enabled,
        "checkpoint_towers": towers,
        "kernels": getattr(args, "kernels", "none"),
        "compile": getattr(args, "compile", False),
        "vision_lr": getattr(args, "vision_lr", None),
        "projector_lr": getattr(args, "projector_lr", None),
        "freeze_llm": getattr(args, "freeze_llm", False),
    }
