"""``phi3v-bench run``'s kernel, compile and per-tower flags, and the checks and file-name parts of those fields.

Each flag sets the :class:`~bench.config.BenchConfig` field of its name, so ``matrix`` sweeps them as axes
(``--grid kernels=none,liger compile=false,true checkpoint_towers=both,llm``). ``--gradient_checkpointing`` takes the
per-tower values of ``phi3v-finetune`` (``both``/``on``, ``llm``, ``vision``, ``off``); ``--gradient-checkpointing``
without a value and ``--no-gradient-checkpointing`` keep their earlier meaning.
"""

from __future__ import annotations

import argparse
from typing import Any

from phi3v_core.cli.common import bounded_float
from phi3v_core.kernels import KERNEL_NAMES
from phi3v_core.towers import CHECKPOINTING_CHOICES, checkpointing_fields

__all__ = ["add_lever_arguments", "lever_suffixes"]


_OFF_FLAGS = ("--no-gradient-checkpointing", "--no_gradient_checkpointing")


class _Checkpointing(argparse.Action):
    """``--gradient_checkpointing [both|llm|vision|off|on]`` → ``gradient_checkpointing`` and ``checkpoint_towers``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        choice = "off" if option_string in _OFF_FLAGS else (values or "both")
        enabled, towers = checkpointing_fields(choice)
        namespace.gradient_checkpointing = enabled
        namespace.checkpoint_towers = towers  # "both" when off: one identity for "no checkpointing"


def add_lever_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpointing per tower, ``--freeze_llm``, tower learning rates, ``--kernels`` and ``--compile``."""
    p.add_argument("--gradient_checkpointing", "--gradient-checkpointing", "--no-gradient-checkpointing",
                   "--no_gradient_checkpointing", dest="gradient_checkpointing", action=_Checkpointing, nargs="?",
                   choices=CHECKPOINTING_CHOICES, default=None, metavar="{both,llm,vision,off}",
                   help="recompute activations in backward in both towers (no value, on), the decoder (llm) or CLIP "
                        "(vision); off or --no-gradient-checkpointing: none (default: the layout's)")
    p.set_defaults(checkpoint_towers=None)
    p.add_argument("--freeze_llm", "--freeze-llm", action="store_const", const=True, default=None,
                   help="train the image path with the language model frozen (method full or lora)")
    p.add_argument("--vision_lr", "--vision-lr", type=bounded_float(0, 1, low_open=True), default=None, metavar="LR",
                   help="learning rate of the CLIP tower (default: --learning-rate)")
    p.add_argument("--projector_lr", "--projector-lr", type=bounded_float(0, 1, low_open=True), default=None,
                   metavar="LR", help="learning rate of the projector and separators (default: --learning-rate)")
    p.add_argument("--kernels", choices=KERNEL_NAMES, default=None,
                   help="liger: Liger's Triton kernels in the decoder (GPU only) (default: none)")
    p.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the model; the first warmup step compiles and is stored as compile_s")


def lever_suffixes(cfg: Any) -> list[str]:
    """File-name parts of the lever fields that differ from their defaults (earlier results keep their names)."""
    return [
        *([f"{cfg.checkpoint_towers}-only"] if cfg.gradient_checkpointing and cfg.checkpoint_towers != "both" else []),
        *(["freeze-llm"] if cfg.freeze_llm else []),
        *([cfg.kernels] if cfg.kernels != "none" else []),
        *(["compiled"] if cfg.compile else []),
    ]
