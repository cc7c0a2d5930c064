"""``phi3v-finetune --preset``: the CookBook's recommended hyper-parameters per task and method (recipe §11)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """Recommended hyper-parameters for one task and method, with where they come from.

    Attributes:
        task: Task the numbers were measured on.
        method: Fine-tuning method.
        values: Flag name (argparse dest) → value.
        source: Provenance (recipe section and table).
        published: The result the recipe reports for these settings.
    """

    task: str
    method: str
    values: dict[str, Any]
    source: str
    published: str


_DOCVQA_SRC = "recipe §11 DocVQA table (--full_train, Phi-3-vision v1, batch 64, 2 epochs)"
_MEMES_SRC = "recipe §11 hateful memes table (Phi-3-vision v1, batch 64)"
_NLVR2_SRC = "recipe §11 NLVR2 table (Phi-3.5-vision, 4 GPUs, bf16 + flash attention, batch 64)"

#: ``--preset`` table: the CookBook's recommended settings (spec/recipe.md §11; num_crops 16 from §3).
#: LoRA α is given as ``--lora_alpha_ratio`` (α = round(r × ratio)): r32/α16 → 0.5, r128/α256 → 2.
#: The DocVQA numbers were measured with ``--full_train`` (the Cauldron DocVQA train set); presets only set
#: hyper-parameters, pass ``--full_train`` yourself to reproduce them.
PRESETS: dict[str, Preset] = {
    "docvqa-full": Preset(
        "docvqa",
        "full",
        {"learning_rate": 5e-6, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _DOCVQA_SRC,
        "ANLS 83.65 (bf16), 82.60 (fp16)",
    ),
    "docvqa-frozen_vision": Preset(
        "docvqa",
        "frozen_vision",
        {"learning_rate": 1e-4, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _DOCVQA_SRC,
        "ANLS 79.19 (bf16), 78.74 (fp16)",
    ),
    "docvqa-lora": Preset(
        "docvqa",
        "lora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 32,
            "lora_alpha_ratio": 0.5,
        },
        _DOCVQA_SRC,
        "ANLS 82.46 (bf16), 82.34 (fp16)",
    ),
    "docvqa-qlora": Preset(
        "docvqa",
        "qlora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 32,
            "lora_alpha_ratio": 0.5,
        },
        _DOCVQA_SRC,
        "ANLS 81.85 (bf16 and fp16)",
    ),
    "hateful_memes-full": Preset(
        "hateful_memes",
        "full",
        {"learning_rate": 5e-5, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _MEMES_SRC,
        "accuracy 86.4 (bf16), 85.4 (fp16)",
    ),
    "hateful_memes-frozen_vision": Preset(
        "hateful_memes",
        "frozen_vision",
        {"learning_rate": 1e-4, "batch_size": 64, "num_train_epochs": 3.0, "num_crops": 16},
        _MEMES_SRC,
        "accuracy 79.4 (bf16), 78.6 (fp16)",
    ),
    "hateful_memes-lora": Preset(
        "hateful_memes",
        "lora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 128,
            "lora_alpha_ratio": 2.0,
        },
        _MEMES_SRC,
        "accuracy 86.6 (bf16), 85.2 (fp16)",
    ),
    "hateful_memes-qlora": Preset(
        "hateful_memes",
        "qlora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 128,
            "lora_alpha_ratio": 2.0,
        },
        _MEMES_SRC,
        "accuracy 84.0 (bf16), 83.8 (fp16)",
    ),
    "nlvr2-full": Preset(
        "nlvr2",
        "full",
        {"learning_rate": 1e-5, "batch_size": 64, "num_train_epochs": 3.0, "num_crops": 16},
        _NLVR2_SRC,
        "accuracy 89.40",
    ),
    "nlvr2-frozen_vision": Preset(
        "nlvr2",
        "frozen_vision",
        {"learning_rate": 2e-5, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _NLVR2_SRC,
        "accuracy 89.20",
    ),
}
