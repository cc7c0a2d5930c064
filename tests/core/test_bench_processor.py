"""Micro-benchmark of the image processor on a document page at 16 crops (runs once under --benchmark-disable)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from phi3v_core.processing import Phi3VImageProcessor


@pytest.fixture(scope="module")
def page() -> Image.Image:
    """A 1700x2200 page-like image: white with dark text-ish noise rows."""
    rng = np.random.default_rng(0)
    array = np.full((2200, 1700, 3), 255, dtype=np.uint8)
    for top in range(100, 2100, 40):
        array[top : top + 12, 150:1550] = rng.integers(0, 90, (12, 1400, 1), dtype=np.uint8)
    return Image.fromarray(array)


def test_bench_image_processor_16_crops(benchmark, page) -> None:
    processor = Phi3VImageProcessor(num_crops=16)
    out = benchmark(processor, page)
    assert tuple(out["pixel_values"].shape) == (1, 17, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[1344, 1344]]
    assert out["num_img_tokens"] == [2509]
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = 1.0 / stats.stats.mean
