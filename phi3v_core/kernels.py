"""Fused training kernels for the decoder: ``--kernels liger`` (Liger Kernel's Triton kernels).

Our decoder is transformers' own ``Phi3Model``, so Liger's Phi-3 patches reach it (tools that run Microsoft's remote
code cannot use them). We patch one model *instance*:

* RMSNorm (every decoder layer's two norms and the final norm) and the SwiGLU MLP (``gate_up_proj`` → SiLU·mul →
  ``down_proj``; the projections stay ``nn.Linear``, so LoRA still wraps them) through
  ``liger_kernel.transformers.apply_liger_kernel_to_phi3(model=...)``;
* RoPE: Liger swaps ``modeling_phi3.apply_rotary_pos_emb``, a module-level function every Phi-3 attention calls;
  this is process-wide (there is no per-instance hook), which is why a run patches once, before training;
* the loss: Liger's fused linear cross-entropy computes ``lm_head`` and the cross-entropy chunk by chunk without
  materialising logits. It is *not* installed as Liger's ``Phi3ForCausalLM.forward`` (that forward knows nothing of
  images and computes the loss over every position); instead our supervised-only loss
  (:meth:`~phi3v_core.model.Phi3VForCausalLM.supervised_loss`) hands it the same hidden states and targets (only
  the positions that predict a label) with ``reduction="sum"`` and divides by the same ``num_items_in_batch``. A
  LoRA-adapted ``lm_head`` (the recipe adapts it) is no plain weight: the loss then stays ours.

Liger's module classes replace ``modeling_phi3.Phi3RMSNorm``/``Phi3MLP`` as a side effect of the call; we put the
originals back, so models built later in the process are not silently patched. Triton runs on GPUs only: a CPU run
is refused before any model is built (:func:`phi3v_core.training.lever_checks.lever_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["KERNEL_NAMES", "KernelPatch", "apply_kernels", "fused_linear_cross_entropy_sum"]

#: ``--kernels`` values.
KERNEL_NAMES: tuple[str, ...] = ("none", "liger")


@dataclass
class KernelPatch:
    """What :func:`apply_kernels` changed.

    Attributes:
        kernels: The ``--kernels`` value.
        replaced: Module names whose ``forward`` is now Liger's, with the Liger class name.
        rope: ``modeling_phi3.apply_rotary_pos_emb`` is Liger's.
        fused_loss: The supervised loss uses Liger's fused linear cross-entropy (where ``lm_head`` is plain).
    """

    kernels: str
    replaced: dict[str, str] = field(default_factory=dict)
    rope: bool = False
    fused_loss: bool = False

    def summary(self) -> str:
        """One line for logs and results."""
        if self.kernels == "none":
            return "kernels none"
        kinds = sorted(set(self.replaced.values()))
        return (f"kernels {self.kernels}: {len(self.replaced)} modules ({', '.join(kinds)})"
                + (", RoPE" if self.rope else "") + (", fused linear cross-entropy" if self.fused_loss else ""))


def apply_kernels(model: nn.Module, kernels: str) -> KernelPatch:
    """Patch ``model`` (a ``Phi3VForCausalLM`` before the method wraps it) with ``kernels``; returns what changed.

    Raises:
        ValueError: Unknown ``kernels`` value.
    """
    if kernels not in KERNEL_NAMES:
        raise ValueError(f"kernels {kernels!r} is not one of {', '.join(KERNEL_NAMES)}")
    patch = KernelPatch(kernels)
    if kernels == "none":
        return patch
    from liger_kernel.transformers import apply_liger_kernel_to_phi3
    from transformers.models.phi3 import modeling_phi3

    originals = (modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP)
    try:
        # The decoder itself (base_model_prefix "model" names no attribute of it, so Liger patches its own layers).
        apply_liger_kernel_to_phi3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                   fused_linear_cross_entropy=False, model=model.model)
    finally:
        modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP = originals
    patch.rope = modeling_phi3.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    for name, module in model.named_modules():
        label = module._get_name()
        if label.startswith("Liger"):
            patch.replaced[name] = label
    model.fused_linear_loss = fused_linear_cross_entropy_sum
    patch.fused_loss = True
    return patch


def fused_linear_cross_entropy_sum(weight: Any, hidden: Any, targets: Any) -> Any:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` without materialising the logits (Liger).

    Under autocast both operands take the autocast dtype (what ``lm_head`` would compute in); the kernel accumulates
    the weight gradient in fp32.
    """
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)
    return loss(weight.to(dtype), hidden.to(dtype), targets).float()
