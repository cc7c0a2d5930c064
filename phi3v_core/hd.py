"""The HD-transform size rule of the Phi-3-vision image processor, in plain integer arithmetic (spec/model.md §7).

One implementation shared by the image processor, the data layer's sequence-length maths and the planner; it imports
neither torch nor PIL so that light tools (``phi3v-plan``) can use it.
"""

from __future__ import annotations

import math

__all__ = ["CROP_SIZE", "hd_crop_grid", "hd_padded_size", "hd_resize_target"]

CROP_SIZE = 336


def hd_resize_target(width: int, height: int, num_crops: int) -> tuple[int, int, bool]:
    """Resize target of the HD transform in the landscape frame: ``(new_w, new_h, transposed)``.

    Portrait images are transposed first; the largest ``scale`` with ``scale · ceil(scale / ratio) ≤ num_crops`` is
    taken (the reference's loop overshoots by one and steps back, in the same float arithmetic), and the width becomes
    ``scale · 336``. The reference truncates the height with ``int()``; we clamp it to one pixel so that images wider
    than ~5000:1 do not crash. Callers validate ``width``, ``height`` > 0 and ``num_crops`` ≥ 1.
    """
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


def hd_padded_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """``(padded_height, padded_width)`` of the HD image: the resize target with its height padded to 336."""
    new_w, new_h, transposed = hd_resize_target(width, height, num_crops)
    padded_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def hd_crop_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """``(rows, cols)`` of 336² crops the processor tiles a ``width × height`` image into."""
    padded_h, padded_w = hd_padded_size(width, height, num_crops)
    return padded_h // CROP_SIZE, padded_w // CROP_SIZE
