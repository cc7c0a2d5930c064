"""Image-token arithmetic (model.md §6/§7) for sequence-length profiles, without touching pixels.

The processor resizes every image so its long side is ``scale·336`` (the largest scale whose crop grid fits
``num_crops``), pads the short side to a multiple of 336 and emits ``N = 144·hc·wc + 12·hc + 157`` placeholder tokens,
``hc``/``wc`` being the padded height/width in 336-pixel crops. The count depends only on the aspect ratio.
"""

from __future__ import annotations

from collections.abc import Iterable

from phi3v_core.data.records import Record, image_size
from phi3v_core.hd import hd_padded_size as shared_hd_padded_size

__all__ = ["CROP", "hd_image_size", "num_image_tokens", "record_image_tokens"]

#: Crop side of the CLIP tower in pixels.
CROP = 336


def hd_image_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Padded ``(height, width)`` the HD transform produces (both multiples of 336; the processor's ``image_sizes``).

    Args:
        width: Original image width in pixels.
        height: Original image height in pixels.
        num_crops: Maximum number of 336² crops (``hd_num``; 1..16 in the recipe).

    Returns:
        ``(padded_height, padded_width)``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    return shared_hd_padded_size(width, height, num_crops)


def num_image_tokens(width: int, height: int, num_crops: int) -> int:
    """Placeholder tokens for one image: ``144·hc·wc + 12·hc + 157`` on the padded HD size."""
    padded_h, padded_w = hd_image_size(width, height, num_crops)
    hc, wc = padded_h // CROP, padded_w // CROP
    return 144 * hc * wc + 12 * hc + 157


def record_image_tokens(record: Record, num_crops: int) -> int:
    """Total image placeholder tokens of a record (image sizes from headers / lazy metadata, no decoding)."""
    return sum(num_image_tokens(*image_size(src), num_crops) for src in record.images)


def mean_image_tokens(sizes: Iterable[tuple[tuple[int, int], float]], num_crops: int) -> float:
    """Expected image tokens under a weighted distribution of ``((width, height), weight)``."""
    pairs = list(sizes)
    total = sum(w for _, w in pairs)
    return sum(num_image_tokens(wd, ht, num_crops) * w for (wd, ht), w in pairs) / total
