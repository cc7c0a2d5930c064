"""What a fine-tuning method *is*, as plain data: the registry entry that planner, bench and selfcheck read.

Torch-free on purpose: ``phi3v-plan`` and ``phi3v-bench report`` read the registry in milliseconds. The code that
changes a model (``prepare``) is named by a ``"module:function"`` reference and imported on first use, so torch,
PEFT and bitsandbytes load only when a model is really prepared.

A method is described by what the rest of the project asks about it:

* which weights train (``trains_base``, ``trains_vision``, ``adapter``) and how the frozen base is stored
  (``quantized``) — the planner's memory model and the bench's FLOP trace read these;
* how it runs (``supports_deepspeed``; ``traced_as``: the method a meta-device trace builds in its place);
* what an adapter adds per adapted linear layer (:class:`Adapter`: parameters, saved activations, backward and
  forward transients, token-independent FLOPs) — the memory and FLOP terms of adapter methods;
* where its numbers come from (``recipe_name``: how the recipe's tables name it, None when it is not in the recipe;
  ``hyperparameters_from``: whose published learning rate and rank it takes).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from phi3v_core.methods.base import MethodOptions, MethodReport

__all__ = ["LORA", "NOT_IN_RECIPE", "Adapter", "Method"]

#: How tables label a method the recipe does not publish.
NOT_IN_RECIPE = "not in the recipe"


@dataclass(frozen=True)
class Adapter:
    """What a LoRA-family adapter adds to one adapted ``Linear(fan_in, fan_out)`` at rank ``r``.

    The base class is plain LoRA (``W x + B A x``): ``A`` is ``r × fan_in``, ``B`` is ``fan_out × r``, both fp32 and
    trained; each token keeps ``A x`` (``r`` elements) for the gradient of ``B``; the adapter's matmuls scale with the
    tokens like the base layer's, so there is no token-independent work. A variant overrides what it adds.

    Attributes:
        label: Name in reports (``"LoRA"``).
    """

    label: str = "LoRA"

    def params(self, rank: int, fan_in: int, fan_out: int) -> int:
        """Trainable parameters on one adapted layer."""
        return rank * (fan_in + fan_out)

    def saved_per_token(self, rank: int, fan_out: int) -> int:
        """Activation elements each token keeps for backward on one adapted layer (beyond the base layer's)."""
        return rank

    def backward_per_token(self, rank: int, fan_out: int) -> int:
        """Gradient elements per token one adapted layer's backward holds beyond the base layer's (0 for LoRA)."""
        return 0

    def forward_transient_bytes(self, rank: int, fan_in: int, fan_out: int, act_bytes: int) -> float:
        """Bytes one adapted layer's forward holds briefly beyond what it saves (0 for LoRA: no weight-sized work)."""
        return 0.0

    def flops_per_forward(self, rank: int, fan_in: int, fan_out: int) -> float:
        """FLOPs one forward of one adapted layer spends independently of the tokens (0 for LoRA)."""
        return 0.0


#: Plain LoRA (the recipe's).
LORA = Adapter()


@dataclass(frozen=True)
class Method:
    """A registry entry.

    Attributes:
        name: Registry and CLI name (``full``, ``frozen_vision``, ``lora``, ``qlora``, ...).
        description: One line for ``--help`` and reports.
        prepare_ref: ``"module:function"`` of ``prepare(model, options) -> (model, report)``; see :meth:`prepare`.
        trains_base: The base weights train (full / frozen_vision): gradients and optimizer states for every trained
            weight, DeepSpeed ZeRO-2 when distributed, 8-bit optimizer and ZeRO-Offload options, fp32 master
            weights on one GPU. False: adapters train over a frozen 16-bit (or nf4) base.
        trains_vision: CLIP and projector base weights train too (full); adapter methods adapt them unless
            ``freeze_vision``.
        adapter: The adapter's terms (None when no adapter trains); the final save is then a PEFT adapter folder.
        quantized: The frozen base is nf4 4-bit (needs a bitsandbytes build with 4-bit kernels for the GPU).
        supports_deepspeed: Whether ZeRO-2 applies (the recipe uses it for full fine-tuning only; with adapters only
            they train and plain DDP is what the recipe runs).
        recipe_name: How the recipe's published tables name the method; None: not in the recipe.
        letter: One-letter code (the planner's "fits" column of the GPU comparison).
        traced_as: The method a meta-device build (memory trace, FLOP count) prepares instead, when this one cannot
            be built there (nf4 layers quantize on ``.to``); None means itself.
        hyperparameters_from: The method whose published presets (learning rate, LoRA rank) this one takes; None
            means its own.
    """

    name: str
    description: str
    prepare_ref: str
    trains_base: bool
    trains_vision: bool
    adapter: Adapter | None
    quantized: bool
    supports_deepspeed: bool
    recipe_name: str | None
    letter: str
    traced_as: str | None = None
    hyperparameters_from: str | None = None

    @property
    def uses_lora(self) -> bool:
        """Adapters train (LoRA family); the final save is a PEFT adapter folder."""
        return self.adapter is not None

    @property
    def recipe_label(self) -> str:
        """``recipe_name``, or "not in the recipe"."""
        return self.recipe_name or NOT_IN_RECIPE

    @property
    def trace_name(self) -> str:
        """The method a meta-device build prepares for this one (``traced_as`` or itself)."""
        return self.traced_as or self.name

    @property
    def preset_name(self) -> str:
        """The method whose published presets this one uses (``hyperparameters_from`` or itself)."""
        return self.hyperparameters_from or self.name

    def trained_towers(self, freeze_vision: bool = False, freeze_llm: bool = False) -> frozenset[str]:
        """The towers (:data:`phi3v_core.towers.TOWERS`) whose weights or adapters train.

        The image path (CLIP tower and projector) trains when the method trains its base weights
        (``trains_vision``) or adapts it (adapter methods unless ``freeze_vision``); the language model trains
        unless ``freeze_llm`` (every method trains it on its own).
        """
        image = self.trains_vision or (self.adapter is not None and not freeze_vision)
        return frozenset((*(("vision", "projector") if image else ()), *(() if freeze_llm else ("llm",))))

    def prepare(self, model: nn.Module, options: MethodOptions) -> tuple[nn.Module, MethodReport]:
        """Apply the method to ``model`` (imports its implementation on first use); returns ``(model, report)``.

        The returned model may be a wrapper (PEFT). ``options.freeze_llm`` then freezes every language-model
        weight and adapter the method left trainable, for every method alike.
        """
        model, report = _resolve(self.prepare_ref)(model, options)
        if getattr(options, "freeze_llm", False):
            from phi3v_core.methods.base import freeze_tower

            report = freeze_tower(model, report, "llm")
        return model, report


def _resolve(ref: str) -> Callable[..., Any]:
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)
