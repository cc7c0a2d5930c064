"""What every fine-tuning method shares: its options and its report (the registry entry type is in ``spec``).

A method changes a freshly built :class:`~phi3v_core.model.Phi3VForCausalLM` from the outside (freezing, LoRA
adapters, 4-bit quantization) and reports exactly which parameters will train. It never touches the optimizer or the
data path, so all methods run through the same Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from phi3v_core.errors import ConfigError
from phi3v_core.model import dead_parameter_names

__all__ = [
    "MethodOptions",
    "MethodReport",
    "VISION_PREFIX",
    "freeze_dead_weights",
    "freeze_tower",
    "make_report",
]

#: Every parameter of the image path (CLIP tower, projector, separators) lives under this prefix.
VISION_PREFIX = "model.vision_embed_tokens."


@dataclass(frozen=True)
class MethodOptions:
    """The knobs a method reads; :class:`~phi3v_core.training.TrainConfig` builds one.

    Attributes:
        lora_rank: LoRA rank ``r``.
        lora_alpha_ratio: ``lora_alpha = round(rank * ratio)`` (the recipe's rule).
        lora_dropout: Dropout on the LoRA input.
        lora_lm_head: Also put LoRA on ``lm_head`` (the recipe always does).
        freeze_vision: For ``lora``/``qlora``: keep CLIP and the projector without adapters.
        base_dtype: dtype of the frozen (non-adapter) weights for ``lora``/``qlora``, and of all weights for
            ``full``/``frozen_vision`` with an 8-bit optimizer; ``None`` keeps the model's.
        compute_dtype: QLoRA matmul dtype of the 4-bit layers.
        device: Where QLoRA quantizes (bitsandbytes quantizes when the weight is moved to a device).
        freeze_llm: After the method, freeze every language-model weight and adapter (train the image path only).
    """

    lora_rank: int = 64
    lora_alpha_ratio: float = 2.0
    lora_dropout: float = 0.0
    lora_lm_head: bool = True
    freeze_vision: bool = False
    base_dtype: torch.dtype | None = None
    compute_dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    freeze_llm: bool = False

    @property
    def lora_alpha(self) -> int:
        """LoRA scaling numerator, rounded like the recipe (rank 64 × 2 → 128)."""
        return round(self.lora_rank * self.lora_alpha_ratio)


@dataclass
class MethodReport:
    """What a method did to the model.

    Attributes:
        method: Registry name.
        trainable_names: Names (as the returned model's ``named_parameters`` spells them) that will train.
        trainable_parameters: Element count of the trainable parameters.
        total_parameters: Element count of all parameters (4-bit weights count their packed storage elements).
        frozen_dead: Dead checkpoint weights that were frozen (last CLIP layer, ``post_layernorm``).
        lora_targets: Module names that got a LoRA adapter (empty for ``full``/``frozen_vision``).
        quantized_modules: Module names replaced by ``bitsandbytes.nn.Linear4bit`` (``qlora`` only).
        notes: Human-readable remarks (e.g. what stays 16-bit).
    """

    method: str
    trainable_names: list[str]
    trainable_parameters: int
    total_parameters: int
    frozen_dead: list[str] = field(default_factory=list)
    lora_targets: list[str] = field(default_factory=list)
    quantized_modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: method, trainable count and share."""
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (
            f"{self.method}: {self.trainable_parameters:,} trainable of {self.total_parameters:,} parameters "
            f"({share:.2f}%)"
        )


def freeze_dead_weights(model: nn.Module) -> list[str]:
    """Freeze the checkpoint weights that never get a gradient and return their names.

    The last CLIP encoder layer and ``post_layernorm`` are in the checkpoint but unused (features come from the
    second-to-last hidden state). Leaving them trainable makes DDP with ``find_unused_parameters=False`` fail with
    "Expected to have finished reduction", which is why the recipe deletes them; we keep them (checkpoint
    compatibility) and freeze them instead.
    """
    dead = dead_parameter_names(model)
    for name, param in model.named_parameters():
        if name in dead:
            param.requires_grad_(False)
    return sorted(dead)


def make_report(model: nn.Module, method: str, **extra: list[str]) -> MethodReport:
    """Build a :class:`MethodReport` and fail when nothing would train.

    Raises:
        ConfigError: No trainable parameter is left (the optimizer would have nothing to do).
    """
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        raise ConfigError(f"method {method!r} left no trainable parameter; check freeze_vision and the LoRA targets")
    return MethodReport(
        method=method,
        trainable_names=[name for name, _ in trainable],
        trainable_parameters=sum(param.numel() for _, param in trainable),
        total_parameters=sum(param.numel() for param in model.parameters()),
        **extra,
    )


def freeze_tower(model: nn.Module, report: MethodReport, tower: str) -> MethodReport:
    """Freeze every trainable parameter of ``tower`` (:func:`phi3v_core.towers.tower_of`) and report again.

    Raises:
        ConfigError: Nothing would train afterwards (e.g. ``frozen_vision`` with the language model frozen too).
    """
    from phi3v_core.towers import tower_of

    frozen = 0
    for name, param in model.named_parameters():
        if param.requires_grad and tower_of(name) == tower:
            param.requires_grad_(False)
            frozen += param.numel()
    if not any(param.requires_grad for param in model.parameters()):
        raise ConfigError(
            f"method {report.method!r} with the {tower} tower frozen trains nothing; drop --freeze_llm or pick a "
            "method that trains the image path (full, lora)"
        )
    again = make_report(model, report.method, frozen_dead=report.frozen_dead, lora_targets=report.lora_targets,
                        quantized_modules=report.quantized_modules, notes=list(report.notes))
    again.notes.append(f"{tower} tower frozen ({frozen:,} parameters that the method would train)")
    return again
