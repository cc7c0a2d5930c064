"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), through PEFT's ``LoraConfig(use_dora=True)``.

Each adapted weight is split into a direction and a magnitude: ``W' = m · (W + s·BA) / ||W + s·BA||`` (norm per output
row). ``A`` and ``B`` are LoRA's, on the same targets (:func:`~phi3v_core.methods.lora.lora_targets`); the magnitude
``m`` (one fp32 value per output row, initialised to the row norms of ``W``) trains too. The norm is treated as a
constant in backward (the paper's section 4.3; PEFT detaches it), so it costs a forward-only pass per step.

Not in the recipe: the planner never recommends it over the recipe's methods, takes LoRA's published settings for
it, and the bench report shows no seed row for it.

What it adds, per adapted ``Linear(fan_in, fan_out)`` at rank ``r`` (:class:`DoraAdapter`, read by the planner):

* parameters: LoRA's ``r·(fan_in + fan_out)`` plus ``fan_out`` magnitudes;
* saved activations: LoRA's ``A x`` plus two ``fan_out``-wide tensors per token (the base output and the LoRA output,
  both multiplied by the trained scale ``m / ||·||``), and as many gradient buffers in backward;
* a weight-sized working set in each forward: ``B A`` (built by pushing an fp32 identity through both matmuls) and
  ``W + s·B A`` for the row norms (for ``lm_head`` this is vocabulary × hidden);
* token-independent FLOPs: ``B A`` formed by pushing an identity through both (``2·r·fan_in·(fan_in + fan_out)``
  multiply-adds ×2 per forward; PEFT avoids ``B.weight @ A.weight`` for FSDP's sake), then the row norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from phi3v_core.methods.spec import Adapter

if TYPE_CHECKING:
    from torch import nn

    from phi3v_core.methods.base import MethodOptions, MethodReport

__all__ = ["DORA", "DoraAdapter", "prepare_dora"]


@dataclass(frozen=True)
class DoraAdapter(Adapter):
    """DoRA's terms on top of LoRA's (see the module docstring)."""

    label: str = "DoRA"

    def params(self, rank: int, fan_in: int, fan_out: int) -> int:
        """LoRA's A and B plus one magnitude per output row."""
        return super().params(rank, fan_in, fan_out) + fan_out

    def saved_per_token(self, rank: int, fan_out: int) -> int:
        """LoRA's ``A x`` plus the base and LoRA outputs that the magnitude scale multiplies."""
        return super().saved_per_token(rank, fan_out) + 2 * fan_out

    def backward_per_token(self, rank: int, fan_out: int) -> int:
        """The gradients towards the base output and the LoRA output (each ``fan_out`` wide)."""
        return 2 * fan_out

    def forward_transient_bytes(self, rank: int, fan_in: int, fan_out: int, act_bytes: int) -> float:
        """The fp32 identity and ``B A`` (PEFT builds both in the adapter's dtype), then ``B A`` in the compute dtype,
        its scaled copy and ``W + s·B A`` for the row norms; the identity stays alive with the graph of ``B A``."""
        return 4.0 * fan_in * fan_in + max(4 + act_bytes, 3 * act_bytes) * fan_in * fan_out

    def flops_per_forward(self, rank: int, fan_in: int, fan_out: int) -> float:
        """``B(A(I))``: the identity through both adapter matmuls (the row norms are element-wise, not counted)."""
        return 2.0 * rank * fan_in * (fan_in + fan_out)


#: The registry's DoRA adapter terms.
DORA = DoraAdapter()


def prepare_dora(model: nn.Module, options: MethodOptions) -> tuple[nn.Module, MethodReport]:
    """Cast the frozen base to ``options.base_dtype`` and attach DoRA adapters (the returned model is a PeftModel).

    Same targets, rank, alpha and dropout as :func:`~phi3v_core.methods.lora.prepare_lora`; the magnitude vectors are
    initialised from the (cast) base weights, so the adapted model starts equal to the base.
    """
    from phi3v_core.methods.lora import attach_lora  # torch and PEFT load only when a model is prepared

    if options.base_dtype is not None:
        model.to(options.base_dtype)
    model, report = attach_lora(model, options, "dora", use_dora=True)
    report.notes.append("DoRA: one trained fp32 magnitude per output row of every adapted layer (not in the recipe)")
    return model, report
