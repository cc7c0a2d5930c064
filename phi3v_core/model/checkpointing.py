"""Activation checkpointing under the names of the installed transformers.

transformers 5.25 renamed gradient checkpointing to *activation* checkpointing (``activation_checkpointing_enable``,
``TrainingArguments(activation_checkpointing=...)``) and made the old names FutureWarning aliases; 5.24, our lowest
tested version, has only the old names. These helpers use the current names where they exist, so no run prints the
deprecation warnings, and the old ones otherwise. Always non-reentrant (``use_reentrant=False``): it works with
frozen inputs (LoRA, frozen_vision) without ``enable_input_require_grads``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["checkpointing_arguments", "enable_activation_checkpointing"]

_KWARGS = {"use_reentrant": False}


def enable_activation_checkpointing(model: Any) -> None:
    """Turn on non-reentrant activation checkpointing in every layer of ``model`` that supports it."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(_KWARGS))
    else:  # transformers < 5.25
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_KWARGS))


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords for checkpointing on or off, under this transformers' names."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": dict(_KWARGS) if enabled else None}
