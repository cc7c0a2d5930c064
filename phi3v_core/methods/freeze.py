"""Full fine-tuning and fine-tuning with a frozen image path."""

from __future__ import annotations

from torch import nn

from phi3v_core.methods.base import VISION_PREFIX, MethodOptions, MethodReport, freeze_dead_weights, make_report

__all__ = ["prepare_full", "prepare_frozen_vision"]


def prepare_full(model: nn.Module, options: MethodOptions) -> tuple[nn.Module, MethodReport]:
    """Train every live parameter; only the dead CLIP weights are frozen (see :func:`freeze_dead_weights`).

    Args:
        model: A freshly built or loaded ``Phi3VForCausalLM``.
        options: ``base_dtype`` casts every weight (16-bit weights with an 8-bit optimizer); None keeps fp32.
    """
    if options.base_dtype is not None:
        model.to(options.base_dtype)
    model.requires_grad_(True)
    dead = freeze_dead_weights(model)
    return model, make_report(model, "full", frozen_dead=dead)


def prepare_frozen_vision(model: nn.Module, options: MethodOptions) -> tuple[nn.Module, MethodReport]:
    """Freeze the CLIP tower, the projector and the ``glb_GN``/``sub_GN`` separators; train the language model.

    Difference from the recipe: its ``--freeze_vision_model`` calls ``requires_grad_(False)`` on the image module,
    which in the remote code also holds the token embedding (``wte``), so the LM input embedding gets frozen by
    accident. Our image module does not hold the embedding, so ``model.embed_tokens`` keeps training here.
    """
    if options.base_dtype is not None:
        model.to(options.base_dtype)  # 16-bit weights with an 8-bit optimizer
    model.requires_grad_(True)
    for name, param in model.named_parameters():
        if name.startswith(VISION_PREFIX):
            param.requires_grad_(False)
    dead = freeze_dead_weights(model)
    report = make_report(model, "frozen_vision", frozen_dead=dead)
    report.notes.append("model.embed_tokens trains (the recipe freezes it through the shared wte module)")
    return model, report
