"""The model's three towers as the per-tower levers see them: names and choices (torch-free).

Phi-3.5-vision has three parts that train differently well (model.md: "CLIP tower", "Projector + separators",
"Phi-3-mini decoder"):

* ``vision``: the CLIP tower, ``model.vision_embed_tokens.img_processor.*``;
* ``projector``: the image projector and the ``glb_GN``/``sub_GN`` separators, the rest of
  ``model.vision_embed_tokens.*``;
* ``llm``: everything else (token embedding, decoder layers, final norm, ``lm_head``).

A parameter's tower is read from its name, so PEFT's wrapped names (``base_model.model.…``, ``….lora_A.default…``)
sort the same as the bare ones. This module is torch-free: the planner and the bench read it in milliseconds.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINTING_CHOICES",
    "TOWERS",
    "checkpointed_towers",
    "checkpointing_choice",
    "checkpointing_fields",
    "tower_of",
]

#: The towers, in model order (image path first).
TOWERS: tuple[str, ...] = ("vision", "projector", "llm")

#: ``--gradient_checkpointing`` values: which towers recompute their activations in backward. ``on`` is the older
#: spelling of ``both``.
CHECKPOINTING_CHOICES: tuple[str, ...] = ("both", "llm", "vision", "off", "on")

_VISION_MARK = "vision_embed_tokens.img_processor."
_IMAGE_MARK = "vision_embed_tokens."


def tower_of(name: str) -> str:
    """The tower (``vision``, ``projector`` or ``llm``) a parameter or module name belongs to."""
    if _VISION_MARK in name:
        return "vision"
    if _IMAGE_MARK in name or name.endswith(("glb_GN", "sub_GN")):
        return "projector"
    return "llm"


def checkpointing_fields(choice: str) -> tuple[bool, str]:
    """``(gradient_checkpointing, checkpoint_towers)`` of a ``--gradient_checkpointing`` value.

    ``off`` → ``(False, "both")`` (the tower field keeps its default: nothing is checkpointed either way);
    ``on``/``both`` → ``(True, "both")``; ``vision``/``llm`` → ``(True, that tower)``.

    Raises:
        ValueError: Not one of :data:`CHECKPOINTING_CHOICES`.
    """
    if choice not in CHECKPOINTING_CHOICES:
        raise ValueError(f"gradient checkpointing {choice!r} is not one of {', '.join(CHECKPOINTING_CHOICES)}")
    if choice == "off":
        return False, "both"
    return True, "both" if choice == "on" else choice


def checkpointing_choice(enabled: bool, towers: str = "both") -> str:
    """The ``--gradient_checkpointing`` value of the two config fields (``off``, ``both``, ``llm``, ``vision``)."""
    return towers if enabled else "off"


def checkpointed_towers(enabled: bool, towers: str = "both") -> frozenset[str]:
    """The towers whose layers recompute in backward: the CLIP tower for ``vision``, the decoder for ``llm``.

    The projector is two linear layers outside any checkpointed block: never recomputed.
    """
    if not enabled:
        return frozenset()
    return frozenset({"vision", "llm"} if towers == "both" else {towers})
