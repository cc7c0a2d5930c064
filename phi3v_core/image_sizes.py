"""Image sizes of the recipe's tasks: the distributions the synthetic twins draw from and the planner's num_crops
table uses, without importing torch.

The recipe publishes one number about its images: DocVQA's mean of 2443.23 tokens at num_crops 16 (Phi-3CookBook
FineTuning_Vision.md). The DocVQA page formats below are weighted to reproduce it; the NLVR2 photo and Hateful Memes
sizes are typical web-image sizes (assumed: the recipe publishes none); UCF-101 is the dataset's 320×240 video.
:mod:`phi3v_core.data.twin_profiles` builds the synthetic twins' profiles from these; ``phi3v-plan --crops-table``
shows what each num_crops does to them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TASK_IMAGES", "TaskImages"]


@dataclass(frozen=True)
class TaskImages:
    """The images of one task's records.

    Attributes:
        task: Task name.
        image_sizes: ``((width, height), weight)`` distribution of each image.
        images_per_record: Images per record (all in the first turn).
        text_tokens: Mean non-image tokens per record as the processor encodes it (BOS per text chunk, chat-template
            tokens, question, answer and end tokens), measured with the Phi-3.5-vision tokenizer over 2000 records.
        default_num_crops: The recipe's num_crops for the task.
        source: Where the sizes come from.
    """

    task: str
    image_sizes: tuple[tuple[tuple[int, int], float], ...]
    images_per_record: int
    text_tokens: float
    default_num_crops: int
    source: str


# Page formats (width, height, weight). At num_crops=16 a page with aspect ratio (long/short) below 4/3 pads to a 4×4
# crop grid (2509 tokens) and one between 4/3 and 5/3 to 4×3 (1933 tokens), whatever its resolution. Letter pages
# (1.29) are the 2509 kind, A4 (1.41) the 1933 kind; the weights put the mean at the recipe's 2443.23 tokens:
# 0.83·2509 + 0.17·1933 + 32.0 text tokens = 2443.1.
_DOC_FORMATS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1700, 2200), 0.47),  # US letter, 200 dpi
    ((1275, 1650), 0.26),  # US letter, 150 dpi
    ((2200, 1700), 0.10),  # US letter landscape, 200 dpi
    ((1654, 2339), 0.11),  # A4, 200 dpi
    ((1240, 1754), 0.06),  # A4, 150 dpi
)
# NLVR2 photos are web images of mixed aspect ratios.
_NLVR2_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((640, 480), 0.3),
    ((500, 375), 0.2),
    ((800, 533), 0.2),
    ((1024, 768), 0.1),
    ((480, 640), 0.1),
    ((600, 600), 0.1),
)
_MEME_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((600, 600), 0.3),
    ((800, 600), 0.25),
    ((500, 700), 0.2),
    ((750, 500), 0.25),
)
_UCF_SIZES: tuple[tuple[tuple[int, int], float], ...] = (((320, 240), 1.0),)

#: Per task (text token means measured with the real tokenizer; see tests/data/test_synthetic.py).
TASK_IMAGES: dict[str, TaskImages] = {
    "docvqa": TaskImages(
        "docvqa", _DOC_FORMATS, 1, 32.0, 16,
        "scanned pages at 150-200 dpi (US letter, A4), weighted to the recipe's published 2443.23-token DocVQA mean "
        "at num_crops 16 (Phi-3CookBook FineTuning_Vision.md)",
    ),
    "nlvr2": TaskImages(
        "nlvr2", _NLVR2_SIZES, 2, 84.0, 16,
        "assumed: two web photos of 375-1024 pixels, mixed aspect ratios (the recipe publishes no sizes)",
    ),
    "hateful_memes": TaskImages(
        "hateful_memes", _MEME_SIZES, 1, 41.4, 16,
        "assumed: memes of 500-800 pixels (the recipe publishes no sizes)",
    ),
    "ucf101": TaskImages(
        "ucf101", _UCF_SIZES, 8, 54.2, 4, "UCF-101's 320x240 video, 8 frames a clip (finetune_hf_trainer_ucf101.py)"
    ),
}  # fmt: skip
