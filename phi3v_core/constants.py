"""The model's and recipe's fixed facts and formulas, each in one place, importable without torch, PIL or transformers.

Processing, model, data, training, bench and the planner all read these; a light command (``phi3v-plan``,
``phi3v-bench report``, ``--help``) can import this module in milliseconds. The published hyper-parameters, sequence
profiles and reference rows live in the data file ``recipe.json`` next to it (:func:`load_recipe`).

Contents:

* names: :data:`ATTN_NAMES`, :data:`PRECISION_NAMES`, :data:`MODEL_PRESET_NAMES`;
* image geometry: :data:`CROP_SIZE`, :data:`MAX_NUM_CROPS`, the HD size rule (:func:`hd_resize_target`,
  :func:`hd_padded_height_width`, :func:`hd_crop_grid`) and the placeholder-token count (:func:`image_token_count`,
  :func:`padded_image_token_count`, :func:`image_token_count_for_size`), as in the checkpoint's processing_phi3_v.py and modeling_phi3_v.py;
* :data:`CONTEXT_LENGTH`;
* the DeepSpeed ZeRO-2 bucket default and buffer rule (:data:`ZERO_BUCKET_ELEMENTS`, :func:`zero2_buffer_bytes`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from phi3v_core.errors import ConfigError, ImageSizeError

__all__ = [
    "AMPERE",
    "ATTN_NAMES",
    "CONTEXT_LENGTH",
    "CROP_SIZE",
    "DEFAULT_ATTN",
    "EIGHT_BIT_OPTIMS",
    "MAX_NUM_CROPS",
    "MODEL_PRESET_NAMES",
    "OFFLOAD_NAMES",
    "OPTIM_NAMES",
    "PRECISION_NAMES",
    "RECIPE_ZERO_BUCKET_ELEMENTS",
    "REPORT_TO",
    "TINY_HIDDEN_SIZE",
    "TOKENS_PER_CROP",
    "ZERO_BUCKET_ELEMENTS",
    "Recipe",
    "RecipePreset",
    "SeqProfile",
    "crop_grid_of_padded",
    "supports_bf16",
    "supports_flash_attention",
    "hd_crop_grid",
    "hd_padded_height_width",
    "hd_resize_target",
    "image_token_count",
    "load_recipe",
    "image_token_count_for_size",
    "is_model_preset",
    "pad_to_crops",
    "padded_image_token_count",
    "zero2_buffer_bytes",
]

# -- names ------------------------------------------------------------------------------------------------------------
#: Attention kernels (transformers' ``attn_implementation`` values); the recipe uses eager or flash_attention_2.
ATTN_NAMES: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2")
#: Our default attention: sdpa has eager's maths, runs everywhere and is faster.
DEFAULT_ATTN = "sdpa"
#: Training precisions: bf16/fp16 mixed precision or plain fp32.
PRECISION_NAMES: tuple[str, ...] = ("bf16", "fp16", "fp32")
#: Optimizers a run can use: torch AdamW (the recipe's), bitsandbytes 8-bit AdamW (bf16 weights for full fine-tuning),
#: its paged (CUDA) variant, and bitsandbytes 8-bit AdamW on fp32 master weights (keeps small updates: see
#: :mod:`phi3v_core.retention`).
OPTIM_NAMES: tuple[str, ...] = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_8bit_fp32_master")
#: The 8-bit (bitsandbytes) optimizers among :data:`OPTIM_NAMES`.
EIGHT_BIT_OPTIMS: tuple[str, ...] = ("adamw_8bit", "paged_adamw_8bit", "adamw_8bit_fp32_master")
#: What DeepSpeed ZeRO-2 may move to host memory: nothing, or the optimizer (fp32 master weights and AdamW states).
OFFLOAD_NAMES: tuple[str, ...] = ("none", "optimizer")
#: ``report_to`` choices (the Trainer's logging integrations we support) and the package each needs.
REPORT_TO: dict[str, str | None] = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}
#: Random-init model configs of the official shapes, by name (``phi3v_core.config.MODEL_PRESETS`` builds them, in this
#: order); light commands check a ``--model`` value against these names without importing transformers.
MODEL_PRESET_NAMES: tuple[str, ...] = ("tiny", "phi-3.5-vision", "phi-3-vision")


def is_model_preset(name: str) -> bool:
    """A preset name: one of :data:`MODEL_PRESET_NAMES` or one registered at run time in
    ``phi3v_core.config.MODEL_PRESETS`` (``bench.selfcheck``'s depth-reduced copies).

    Whoever registered one has imported that module, so it is read only when already loaded: the check imports no
    transformers.
    """
    if name in MODEL_PRESET_NAMES:
        return True
    config = sys.modules.get("phi3v_core.config")
    return config is not None and name in config.MODEL_PRESETS

# -- GPU generations --------------------------------------------------------------------------------------------------
#: The first compute capability with bf16 tensor cores and FlashAttention-2 support (Ampere, e.g. A100).
AMPERE = (8, 0)


def supports_bf16(cc: tuple[int, int]) -> bool:
    """Native bf16 tensor cores: compute capability >= 8.0 (Ampere; NVIDIA A100 datasheet).

    ``torch.cuda.is_bf16_supported()`` says True on V100/T4 too (it counts emulation), so callers ask this instead.
    """
    return tuple(cc) >= AMPERE


def supports_flash_attention(cc: tuple[int, int]) -> bool:
    """FlashAttention-2 runs: compute capability >= 8.0 (the flash-attn README: Ampere, Ada or Hopper GPUs)."""
    return tuple(cc) >= AMPERE


# -- image geometry ---------------------------------------------------------------------------------------------------
#: Side of one HD crop in pixels (CLIP ViT-L/14-336).
CROP_SIZE = 336
#: Largest ``num_crops`` the recipe allows (the CookBook asserts ``num_crops <= 16``).
MAX_NUM_CROPS = 16
#: LM tokens per 336² crop after the 2×2 merge (12 × 12).
TOKENS_PER_CROP = 144

#: Context length of both official checkpoints (``max_position_embeddings``, LongRoPE; 4096 before scaling).
CONTEXT_LENGTH = 131072

#: The ``tiny`` preset's decoder width (``phi3v_core.config.tiny_config``), known here so that a first answer can check
#: sizes against it without importing transformers.
TINY_HIDDEN_SIZE = 64

# -- DeepSpeed ZeRO-2 buckets -----------------------------------------------------------------------------------------
#: ``reduce_bucket_size`` / ``allgather_bucket_size`` phi3v-finetune uses (elements). Not the recipe's 5e8: with
#: ``overlap_comm`` DeepSpeed keeps buffers of about 4.5× both buckets, ~9 GB per GPU at 5e8 in 16-bit and ~0.9 GB at
#: 5e7, while 5e7-element (100 MB) buckets still saturate NCCL.
ZERO_BUCKET_ELEMENTS = 50_000_000
#: The recipe's bucket sizes (``DS_CONFIG_DICT`` in the CookBook vision fine-tuning scripts), for reproducing its memory numbers.
RECIPE_ZERO_BUCKET_ELEMENTS = 500_000_000
#: Supervised positions per ``lm_head`` + cross-entropy chunk in training (``phi3v_core.model``): bounds the fp32
#: [chunk × vocabulary] buffers (log-softmax, its gradient, the logits' gradient: 3 × 4 B × 32064 × 1024 ≈ 0.37 GiB).
LOSS_CHUNK_TOKENS = 1024


def zero2_buffer_bytes(
    reduce_bucket: float, allgather_bucket: float, overlap_comm: bool = True, bytes_per_element: int = 2
) -> float:
    """Extra GPU memory of the ZeRO-2 communication buffers (the HF DeepSpeed guide's rule of thumb).

    With ``overlap_comm`` DeepSpeed holds about 4.5 × (allgather + reduce bucket) elements; without it, about 1 ×
    each. The recipe's 5e8/5e8 in 16-bit gives 9 GB; our 5e7 default 0.9 GB.

    Args:
        reduce_bucket: ``reduce_bucket_size`` in elements.
        allgather_bucket: ``allgather_bucket_size`` in elements.
        overlap_comm: DeepSpeed's ``overlap_comm``.
        bytes_per_element: Gradient element size (2 for bf16/fp16).

    Returns:
        Bytes (a float; callers that need an int round it).
    """
    factor = 4.5 if overlap_comm else 1.0
    return factor * (reduce_bucket + allgather_bucket) * bytes_per_element


# -- the HD size rule (processing_phi3_v.py) ----------------------------------------------------------------------------
def hd_resize_target(width: int, height: int, num_crops: int) -> tuple[int, int, bool]:
    """Resize target of the HD transform in the landscape frame: ``(new_w, new_h, transposed)``.

    Portrait images are transposed first; the largest ``scale`` with ``scale · ceil(scale / ratio) ≤ num_crops`` is
    taken (the reference's loop overshoots by one and steps back, in the same float arithmetic), and the width becomes
    ``scale · 336``. The reference truncates the height with ``int()``; we clamp it to one pixel so that images wider
    than ~5000:1 do not crash.

    Args:
        width: Original image width in pixels.
        height: Original image height in pixels.
        num_crops: Maximum number of 336² crops (``hd_num``; 1..16 in the recipe).

    Raises:
        ImageSizeError: An empty side.
        ConfigError: ``num_crops < 1``.
    """
    if width <= 0 or height <= 0:
        raise ImageSizeError(f"image has an empty side ({width}x{height} pixels); remove it from the data")
    if num_crops < 1:
        raise ConfigError(f"num_crops must be >= 1, got {num_crops}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * CROP_SIZE
    return new_w, max(1, int(new_w / ratio)), transposed


def pad_to_crops(side: int) -> int:
    """``side`` rounded up to a multiple of 336 (how the HD transform pads the short side)."""
    return math.ceil(side / CROP_SIZE) * CROP_SIZE


def hd_padded_height_width(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """``(padded_height, padded_width)`` of the HD image (the processor's ``image_sizes``): both multiples of 336.

    The resize target of :func:`hd_resize_target` with its short side padded up to a multiple of 336.
    """
    new_w, new_h, transposed = hd_resize_target(width, height, num_crops)
    padded_h = pad_to_crops(new_h)
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def crop_grid_of_padded(padded_height: int, padded_width: int) -> tuple[int, int]:
    """``(rows, cols)`` of 336² crops of a padded HD image.

    Raises:
        ImageSizeError: A side that is not a positive multiple of 336 (not produced by the image processor).
    """
    if padded_height <= 0 or padded_width <= 0 or padded_height % CROP_SIZE or padded_width % CROP_SIZE:
        raise ImageSizeError(
            f"image size {(padded_height, padded_width)} is not a positive multiple of {CROP_SIZE} "
            "(use Phi3VImageProcessor)"
        )
    return padded_height // CROP_SIZE, padded_width // CROP_SIZE


def hd_crop_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """``(rows, cols)`` of 336² crops the processor tiles a ``width × height`` image into."""
    return crop_grid_of_padded(*hd_padded_height_width(width, height, num_crops))


def image_token_count(rows: int, cols: int, tokens_per_crop: int = TOKENS_PER_CROP) -> int:
    """Placeholder tokens for one image with a ``rows × cols`` crop grid (modeling_phi3_v.py's image embedding).

    The sub-image grid with one separator per merged row, ``glb_GN``, and the global image with its separators:
    ``t·r·c + s·r + 1 + s·(s+1)`` with ``s = √t``, i.e. ``144·r·c + 12·r + 157`` for the real 144 tokens per crop.
    """
    side = math.isqrt(tokens_per_crop)
    return tokens_per_crop * rows * cols + side * rows + 1 + side * (side + 1)


def padded_image_token_count(padded_height: int, padded_width: int) -> int:
    """Placeholder tokens of one image from its padded HD size ``(H, W)`` (multiples of 336)."""
    return image_token_count(*crop_grid_of_padded(padded_height, padded_width))


def image_token_count_for_size(width: int, height: int, num_crops: int) -> int:
    """Placeholder tokens of one ``width × height`` image at ``num_crops`` (no pixels touched)."""
    return image_token_count(*hd_crop_grid(width, height, num_crops))


# -- the recipe data file ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipePreset:
    """Published hyper-parameters for one task and method (``phi3v-finetune --preset``).

    Attributes:
        task: Task the numbers were measured on.
        method: Fine-tuning method.
        values: Flag name (``phi3v-finetune`` argparse dest) → value.
        source: Provenance (recipe section and table).
        published: The result the recipe reports for these settings.
    """

    task: str
    method: str
    values: dict[str, Any]
    source: str
    published: str


@dataclass(frozen=True)
class SeqProfile:
    """Shape of one typical training sample of a task (the benchmark's and planner's synthetic workload).

    Attributes:
        name: Profile (task) name.
        images_per_sample: Images in one conversation.
        image_width: Source image width in pixels.
        image_height: Source image height in pixels.
        text_tokens: Non-image tokens per sample (chat tags, prompt and answer).
        recommended_num_crops: The ``num_crops`` the recipe uses for this dataset.
        source: Where the numbers come from (published vs derived vs assumed).
        answer_tokens: Supervised (labelled) tokens per sample: the answer plus ``<|end|>\n<|endoftext|>``; the
            positions training computes logits at.
    """

    name: str
    images_per_sample: int
    image_width: int
    image_height: int
    text_tokens: int
    recommended_num_crops: int
    source: str
    answer_tokens: int = 0

    def image_tokens(self, num_crops: int | None = None) -> int:
        """Placeholder tokens of all images of one sample (at ``recommended_num_crops`` unless given)."""
        crops = self.recommended_num_crops if num_crops is None else num_crops
        return self.images_per_sample * image_token_count_for_size(self.image_width, self.image_height, crops)


@dataclass(frozen=True)
class Recipe:
    """The contents of ``phi3v_core/recipe.json``.

    Attributes:
        recipe_defaults: The CookBook scripts' argparse defaults (``batch_size``, ``learning_rate``, ...).
        training_arguments: The recipe's fixed ``TrainingArguments`` (global batch of its examples, AdamW, schedule).
        presets: ``"<task>-<method>"`` → published hyper-parameters.
        profiles: Task → typical sample shape.
        reference_speed: The published training-speed rows (``results/reference/speed.csv``), typed.
        reference_accuracy: The published accuracy rows (``results/reference/accuracy.csv``), typed.
        sources: Provenance notes of the file's sections.
    """

    recipe_defaults: dict[str, Any]
    training_arguments: dict[str, Any]
    presets: dict[str, RecipePreset]
    profiles: dict[str, SeqProfile]
    reference_speed: tuple[dict[str, Any], ...]
    reference_accuracy: tuple[dict[str, Any], ...]
    sources: dict[str, str]


@lru_cache(maxsize=1)
def load_recipe() -> Recipe:
    """Read ``recipe.json`` (package data) once; torch-free.

    Returns:
        The typed recipe. Treat it as read-only: it is shared between callers.
    """
    raw = json.loads(resources.files("phi3v_core").joinpath("recipe.json").read_text(encoding="utf-8"))
    return Recipe(
        recipe_defaults=dict(raw["recipe_defaults"]),
        training_arguments=dict(raw["training_arguments"]),
        presets={name: RecipePreset(**entry) for name, entry in raw["presets"].items()},
        profiles={name: SeqProfile(name=name, **entry) for name, entry in raw["profiles"].items()},
        reference_speed=tuple(raw["reference_speed"]),
        reference_accuracy=tuple(raw["reference_accuracy"]),
        sources=dict(raw["_sources"]),
    )
