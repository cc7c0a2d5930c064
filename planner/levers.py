"""What the planner predicts for each kernel, compiler and per-tower axis, and the published figures it relies on.

``phi3v-plan --levers`` prints this table. An axis the memory and speed model does not capture says so plainly
("not modelled") instead of borrowing someone else's speed-up as a prediction; the published figures are listed
next to it, with their sources, as what others measured on other models (they are not applied to any number).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LEVERS", "Lever", "PublishedFigure", "levers_table", "render_levers"]


@dataclass(frozen=True)
class PublishedFigure:
    """A number someone published about an axis, with where it is written.

    Attributes:
        claim: The claim as published (model, hardware and setting included where the source gives them).
        source: URL of the page that states it.
    """

    claim: str
    source: str


@dataclass(frozen=True)
class Lever:
    """One axis: its flag, what the planner predicts it changes, and the published figures behind that.

    Attributes:
        axis: The flag (as ``phi3v-finetune`` and ``phi3v-bench run`` spell it).
        memory: What the memory model predicts, or "not modelled".
        speed: What the speed model predicts, or "not modelled".
        figures: Published figures (none where the prediction is our own model's).
    """

    axis: str
    memory: str
    speed: str
    figures: tuple[PublishedFigure, ...] = field(default_factory=tuple)


_LIGER_README = "https://github.com/linkedin/Liger-Kernel#readme"
_LIGER_PAPER = "https://arxiv.org/abs/2410.10989"
_COMPILE_DOCS = "https://github.com/pytorch/pytorch/blob/v2.1.0/docs/source/compile/index.rst"

#: Every lever axis, in the order ``--levers`` prints them.
LEVERS: tuple[Lever, ...] = (
    Lever(
        "--kernels liger",
        "not modelled (the plan assumes --kernels none; our supervised-only logits already avoid the full "
        "[sequence x vocabulary] logits, which is where Liger's published memory savings come from)",
        "not modelled (measure it: phi3v-bench matrix --grid kernels=none,liger)",
        (
            PublishedFigure("multi-GPU training throughput +20%, memory usage -60% (Liger's headline; LLMs with "
                            "materialised logits)", _LIGER_README),
            PublishedFigure("Hugging Face Trainer, LLaMA 3-8B on Alpaca, 4 A100s with FSDP: ~20% faster, over 40% "
                            "less memory", _LIGER_README),
            PublishedFigure("tech report: on average +20% throughput and -60% GPU memory across popular LLMs",
                            _LIGER_PAPER),
        ),
    ),
    Lever(
        "--compile",
        "not modelled",
        "not modelled; the first step(s) compile: phi3v-bench stores that time as compile_s, apart from step times",
        (
            PublishedFigure("inductor: 30% to 2x speed-ups and 10% memory compression on real-world models, training "
                            "and inference (PyTorch's torch.compile documentation, citing pytorch/pytorch#93794)",
                            _COMPILE_DOCS),
        ),
    ),
    Lever(
        "--gradient_checkpointing both|llm|vision|off",
        "modelled per tower: a checkpointed tower keeps only each layer's input and holds one layer's working set "
        "in backward; the other keeps every layer's saved tensors",
        "modelled per tower: a checkpointed tower runs its forward once more in backward (never lm_head)",
    ),
    Lever(
        "--freeze_llm",
        "modelled: gradients and optimizer states only for the image path (CLIP tower and projector, or their "
        "adapters); the language model still keeps its activations, gradients flow through it to the image",
        "modelled: the decoder skips its weight gradients (input gradients only)",
    ),
    Lever(
        "--vision_lr / --projector_lr",
        "no change predicted (one optimizer group per tower: same states)",
        "no change predicted",
    ),
)


def levers_table() -> list[dict[str, Any]]:
    """The axes as plain dicts (``phi3v-plan --levers --json``)."""
    return [asdict(lever) for lever in LEVERS]


def render_levers() -> str:
    """The axes as text: prediction per axis, then the published figures with sources."""
    lines = ["What phi3v-plan predicts for each axis (published figures are others' measurements, not applied):"]
    for lever in LEVERS:
        lines += [f"{lever.axis}", f"  memory: {lever.memory}", f"  speed:  {lever.speed}"]
        lines += [f"  published: {figure.claim} ({figure.source})" for figure in lever.figures]
    return "\n".join(lines)
