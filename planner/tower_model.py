"""The per-tower terms of the memory and speed models: which towers recompute, which train (pure functions).

``TrainSetup.checkpoint_towers`` (``both``, ``llm``, ``vision``) says where gradient checkpointing applies when it is
on; ``TrainSetup.freeze_llm`` freezes the language model after the method (``--freeze_llm``): only the image path
(CLIP tower and projector, or their adapters) keeps gradients and optimizer states, while the decoder still runs
forward and an input-gradient backward (the loss reaches the image through it).
"""

from __future__ import annotations

from typing import Any

# ``TrainSetup`` (planner.estimate, which imports this module) and ``ModelShape``, typed loosely to keep imports
# one-way.
TrainSetup = Any
ModelShape = Any

__all__ = ["checkpoints", "trained_adapter_params", "trained_params"]


def checkpoints(setup: TrainSetup, tower: str) -> bool:
    """Whether ``tower`` (``llm`` or ``vision``) recomputes its layers in backward under ``setup``."""
    return setup.gradient_checkpointing and setup.checkpoint_towers in ("both", tower)


def trained_adapter_params(shape: ModelShape, setup: TrainSetup, lora: int) -> int:
    """Adapter parameters that get gradients: all of ``lora``, or only the image path's with ``freeze_llm``."""
    if not setup.freeze_llm:
        return lora
    adapter = setup.spec.adapter
    if adapter is None or not setup.lora_vision:
        return 0
    language = shape.lora_params(setup.lora_rank, setup.lora_lm_head, vision=False, adapter=adapter)
    return lora - language


def trained_params(shape: ModelShape, setup: TrainSetup, lora: int) -> int:
    """Parameters with gradients and optimizer states under ``setup`` (the method's, less the LM's with
    ``freeze_llm``; the dead CLIP weights never train)."""
    counts = shape.param_counts()
    if setup.spec.uses_lora:
        return trained_adapter_params(shape, setup, lora)
    if not setup.freeze_llm:
        return counts.trainable(setup.spec, lora)
    return counts.vision + counts.projector - counts.vision_dead if setup.spec.trains_vision else 0
