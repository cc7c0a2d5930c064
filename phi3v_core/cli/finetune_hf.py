"""``phi3v-finetune``'s Hugging Face Trainer flags: the ``TrainingArguments`` names an HF user types first.

``--gradient_accumulation_steps``, ``--lr_scheduler_type``, ``--logging_steps``, ``--report_to`` and ``--deepspeed``
are parsed here and passed to the Trainer through :class:`~phi3v_core.training.TrainConfig`
(``--per_device_train_batch_size`` and ``--resume_from_checkpoint`` are spellings of the recipe's flags, see
:mod:`phi3v_core.cli.vocabulary`). Torch-free: validation runs before the training stack is imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from phi3v_core.cli.common import bounded_int
from phi3v_core.constants import REPORT_TO

__all__ = ["LR_SCHEDULERS", "REPORT_TO", "add_trainer_flags", "path_problems", "trainer_values"]

#: ``transformers.SchedulerType`` values that need no extra arguments.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)


def add_trainer_flags(group: argparse._ArgumentGroup) -> None:
    """The TrainingArguments flags (same names and meaning as ``transformers``)."""
    group.add_argument(
        "--gradient_accumulation_steps",
        type=bounded_int(1, 65536),
        default=None,
        metavar="N",
        help="micro-steps per optimizer step; sets --batch_size to per-device batch × N × processes",
    )
    group.add_argument(
        "--lr_scheduler_type", choices=LR_SCHEDULERS, default=None, help="learning-rate schedule (default: linear, as the recipe)"
    )
    group.add_argument("--logging_steps", type=bounded_int(1, 10**8), default=None, metavar="N", help="log every N steps (default: 1)")
    group.add_argument(
        "--report_to",
        choices=tuple(REPORT_TO),
        default="none",
        help="tensorboard: event files in OUTPUT_DIR/runs (pip install tensorboard); wandb: Weights & Biases "
        "(pip install wandb); default none",
    )
    group.add_argument(
        "--deepspeed",
        default=None,
        metavar="CONFIG",
        help="a DeepSpeed JSON config for the Trainer (full/frozen_vision; replaces the built-in ZeRO-2 of --offload)",
    )


def trainer_values(args: argparse.Namespace, values: dict[str, Any], world_size: int, problems: list[str]) -> dict[str, Any]:
    """The :class:`TrainConfig` fields the Trainer flags set (their values are judged by ``TrainConfig.problems``).

    ``--gradient_accumulation_steps`` turns into the global batch (``values["batch_size"]`` is updated); a
    ``--batch_size`` given as well must agree with it (a conflict between two flags, reported here).

    Args:
        args: The parsed flags.
        values: The resolved numbers (``batch_size``, ``batch_size_per_gpu``); updated in place.
        world_size: Training processes.
        problems: Where problems are appended (all reported at once by the caller).

    Returns:
        TrainConfig keyword arguments.
    """
    fields: dict[str, Any] = {}
    steps = getattr(args, "gradient_accumulation_steps", None)
    if steps is not None:
        implied = values["batch_size_per_gpu"] * steps * world_size
        if args.batch_size is not None and args.batch_size != implied:
            problems.append(
                f"--batch_size {args.batch_size} disagrees with --per_device_train_batch_size "
                f"{values['batch_size_per_gpu']} × --gradient_accumulation_steps {steps} × {world_size} process(es) "
                f"= {implied}; pass --batch_size or --gradient_accumulation_steps, not both"
            )
        values["batch_size"] = implied
    if getattr(args, "lr_scheduler_type", None) is not None:
        fields["lr_scheduler"] = args.lr_scheduler_type
    if getattr(args, "logging_steps", None) is not None:
        fields["logging_steps"] = args.logging_steps
    fields["report_to"] = getattr(args, "report_to", "none") or "none"
    config = getattr(args, "deepspeed", None)
    if config is not None:
        fields["deepspeed"] = True
        fields["deepspeed_config_file"] = str(Path(config).expanduser())
    return fields


def path_problems(args: argparse.Namespace) -> list[str]:
    """The files the Trainer flags name (a checkpoint to resume, a DeepSpeed config), checked before torch is imported
    so a wrong path answers at once (their content is judged by ``TrainConfig.problems``).

    Args:
        args: The parsed flags.
    """
    problems = []
    resume = getattr(args, "resume", None)
    if resume not in (None, "latest") and not Path(resume).expanduser().exists():
        problems.append(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed is not None and not Path(deepspeed).expanduser().is_file():
        problems.append(f"--deepspeed {deepspeed}: no such file; pass a DeepSpeed JSON config file")
    return problems
