"""Micro-benchmarks of the image processor and the full processor (run once under the suite's --benchmark-disable).

See README "Micro-benchmarks" for measuring them against the saved baseline (``--benchmark-compare``).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from phi3v_core.processing import Phi3VImageProcessor, Phi3VProcessor


def page_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A page-like image: white with dark text-ish noise rows."""
    rng = np.random.default_rng(seed)
    array = np.full((height, width, 3), 255, dtype=np.uint8)
    for top in range(60, height - 60, 40):
        array[top : top + 12, 60 : width - 60] = rng.integers(0, 90, (12, width - 120, 1), dtype=np.uint8)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def page() -> Image.Image:
    return page_image(1700, 2200)


def _rate(benchmark, items: int) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = items / stats.stats.mean


def test_bench_image_processor_16_crops(benchmark, page) -> None:
    processor = Phi3VImageProcessor(num_crops=16)
    out = benchmark(processor, page)
    assert tuple(out["pixel_values"].shape) == (1, 17, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[1344, 1344]]
    assert out["num_img_tokens"] == [2509]
    _rate(benchmark, 1)


def test_bench_image_processor_docvqa_page(benchmark) -> None:
    """The DocVQA profile's 16-crop 1008×1680 page (portrait, no resize: transpose-free path)."""
    processor = Phi3VImageProcessor(num_crops=16)
    out = benchmark(processor, page_image(1008, 1680))
    assert out["image_sizes"].tolist() == [[1680, 1008]] and out["num_img_tokens"] == [2377]
    _rate(benchmark, 1)


def test_bench_image_processor_batch(benchmark) -> None:
    """A batch of 8 pages of mixed sizes and orientations (resizes along one or both axes)."""
    sizes = [(1700, 2200), (1008, 1680), (2000, 500), (640, 480), (1024, 768), (768, 1024), (1240, 1754), (500, 333)]
    images = [page_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    processor = Phi3VImageProcessor(num_crops=16)
    out = benchmark(processor, images)
    assert tuple(out["pixel_values"].shape) == (8, 17, 3, 336, 336)
    _rate(benchmark, len(images))


def test_bench_processor_training_example(benchmark) -> None:
    """One training example end to end: chat template, HD transform, tokenizer, labels (tiny tokenizer)."""
    processor = Phi3VProcessor.tiny(num_crops=16)
    turn = [{"user": "What is the total on this invoice?", "assistant": "42.50", "images": [page_image(1008, 1680)]}]
    example = benchmark(processor.encode_conversation, turn)
    assert (example["input_ids"] < 0).sum().item() == 2377
    _rate(benchmark, 1)
