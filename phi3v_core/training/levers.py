"""The per-tower and kernel levers of a run: optimizer groups, checkpointing and model patches (their checks are
:mod:`phi3v_core.training.lever_checks`, torch-free).

* **Per-tower learning rates** (``vision_lr``, ``projector_lr``): one optimizer parameter group per tower (and
  weight-decay class); the language model keeps ``learning_rate``. The scheduler scales every group alike, so the
  ratios hold through warm-up and decay.
* **Per-tower gradient checkpointing** (``checkpoint_towers``): transformers' ``gradient_checkpointing_enable`` turns
  checkpointing on in every layer that supports it (decoder layers and CLIP encoder layers); we switch it back off
  in the tower that should keep its activations.
* **``freeze_llm``**: the method registry freezes the language model after the method (``MethodOptions``).
* **Kernels** (``kernels="liger"``): :mod:`phi3v_core.kernels` patches the decoder; Triton needs a GPU.
* **``compile``**: ``torch.compile`` of the model through the Trainer (``TrainingArguments.torch_compile``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from phi3v_core.towers import tower_of

# ``TrainConfig`` (phi3v_core.training.config), typed loosely to keep imports one-way.
TrainConfig = Any

__all__ = ["TowerCheckpointing", "trainer_levers", "restrict_checkpointing", "tower_learning_rates", "tower_param_groups"]


def tower_learning_rates(cfg: TrainConfig) -> dict[str, float]:
    """Learning rate per tower: ``vision_lr``/``projector_lr`` where given, else ``learning_rate``."""
    return {
        "vision": cfg.vision_lr or cfg.learning_rate,
        "projector": cfg.projector_lr or cfg.learning_rate,
        "llm": cfg.learning_rate,
    }


def trainer_levers(cfg: TrainConfig) -> dict[str, Any]:
    """The ``Phi3VTrainer`` arguments of the per-tower levers (tower rates only when one differs)."""
    rates = tower_learning_rates(cfg) if cfg.vision_lr or cfg.projector_lr else None
    return {"tower_rates": rates, "checkpoint_towers": cfg.checkpoint_towers}


def tower_param_groups(
    model: nn.Module, rates: dict[str, float], weight_decay: float, decay_names: set[str] | list[str]
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one per (tower, decays) pair that has trainable parameters.

    Each group carries its ``lr`` (and a ``tower`` key, for logs and tests); weight decay follows the Trainer's
    rule (``decay_names``: no decay on biases and norms).
    """
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    decay = set(decay_names)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower, decays = tower_of(name), name in decay
        group = groups.setdefault(
            (tower, decays),
            {"params": [], "lr": rates[tower], "weight_decay": weight_decay if decays else 0.0, "tower": tower},
        )
        group["params"].append(param)
    return list(groups.values())


def restrict_checkpointing(model: nn.Module, towers: str) -> list[str]:
    """Switch gradient checkpointing off in the tower that should keep its activations; returns those modules.

    Called after ``gradient_checkpointing_enable`` (which sets ``gradient_checkpointing = True`` on every layer
    that supports it). ``towers`` is ``both`` (nothing to do), ``llm`` (CLIP layers keep activations) or ``vision``
    (decoder layers keep them).
    """
    if towers == "both":
        return []
    keep = "llm" if towers == "vision" else "vision"
    switched = []
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True and tower_of(name + ".") == keep:
            module.gradient_checkpointing = False
            switched.append(name)
    return switched


class TowerCheckpointing(TrainerCallback):
    """At train begin (after the Trainer turned checkpointing on everywhere), keep it only in ``towers``."""

    def __init__(self, towers: str) -> None:
        self.towers = towers
        self.switched_off: list[str] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and args.gradient_checkpointing:
            self.switched_off = restrict_checkpointing(model, self.towers)
