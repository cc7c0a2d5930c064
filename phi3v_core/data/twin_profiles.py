"""Sequence-length profiles of the offline synthetic twins: image-size distributions and mean text tokens.

The twins' generators (:mod:`phi3v_core.data.synthetic`) draw their image sizes from these profiles, so the expected
sequence length computed here is the one the generated records have.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3v_core.data.seqlen import mean_image_tokens

__all__ = ["TWIN_PROFILES", "TwinProfile", "expected_mean_sequence_length"]


@dataclass(frozen=True)
class TwinProfile:
    """Sequence-length profile of one twin.

    Attributes:
        task: Task name.
        image_sizes: ``((width, height), weight)`` distribution of each image.
        images_per_record: Images per record (all in the first turn).
        text_tokens: Mean non-image tokens per record as the processor encodes it (BOS per text chunk, chat-template
            tokens, question, answer and end tokens), measured with the Phi-3.5-vision tokenizer over 2000 records.
        default_num_crops: The recipe's num_crops for the task.
    """

    task: str
    image_sizes: tuple[tuple[tuple[int, int], float], ...]
    images_per_record: int
    text_tokens: float
    default_num_crops: int

    def mean_image_tokens(self, num_crops: int | None = None) -> float:
        """Expected image placeholder tokens per record."""
        crops = self.default_num_crops if num_crops is None else num_crops
        return self.images_per_record * mean_image_tokens(self.image_sizes, crops)

    def mean_sequence_length(self, num_crops: int | None = None) -> float:
        """Expected tokens per encoded record (image + text)."""
        return self.mean_image_tokens(num_crops) + self.text_tokens


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

#: Profiles of the twins (text token means measured with the real tokenizer; see tests/data/test_synthetic.py).
TWIN_PROFILES: dict[str, TwinProfile] = {
    "docvqa": TwinProfile("docvqa", _DOC_FORMATS, 1, 32.0, 16),
    "nlvr2": TwinProfile("nlvr2", _NLVR2_SIZES, 2, 84.0, 16),
    "hateful_memes": TwinProfile("hateful_memes", _MEME_SIZES, 1, 41.4, 16),
    "ucf101": TwinProfile("ucf101", _UCF_SIZES, 8, 54.2, 4),
}


def expected_mean_sequence_length(task: str, num_crops: int | None = None) -> float:
    """Expected mean encoded sequence length (tokens) of a twin's records.

    Args:
        task: ``docvqa``, ``nlvr2``, ``hateful_memes`` or ``ucf101``.
        num_crops: Processor num_crops (default: the recipe's value for the task).

    Returns:
        Mean image placeholder tokens (exact expectation over the twin's image-size distribution) plus the mean text
        tokens. For ``docvqa`` at 16 crops this is ≈2443 tokens, the recipe's measured DocVQA average.
    """
    if task not in TWIN_PROFILES:
        raise ValueError(f"no synthetic twin for {task!r}; choose one of {', '.join(TWIN_PROFILES)}")
    return TWIN_PROFILES[task].mean_sequence_length(num_crops)
