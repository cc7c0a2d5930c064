"""A deterministic synthetic image-text dataset, encoded by the real processor.

Used by the launcher when no real data is configured (smoke runs, multi-process tests) and by ``phi3v-bench``
(:mod:`phi3v_core.training.workload` sizes it to a sequence profile): every example is one or more noise-block images of a fixed
size plus random words, run through ``Phi3VProcessor.encode_conversation`` exactly like real data, so sequence
lengths and image tensors have realistic shapes for the chosen ``num_crops``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from phi3v_core.constants import CROP_SIZE
from phi3v_core.processing import Phi3VProcessor

__all__ = ["SyntheticDataset", "synthetic_dataset"]

_WORDS = (
    "image chart table sign shop street river cloud house bridge green red blue small large left right top bottom "
    "people car tree sky water paper text number price name date total what where which how many colour"
).split()


class SyntheticDataset(Dataset):
    """``num_examples`` examples; example ``i`` depends only on ``(seed, i)`` (safe for workers and resume).

    Args:
        num_examples: Dataset length.
        processor: The processor to encode with (``Phi3VProcessor.tiny(num_crops)`` when omitted).
        num_crops: Crops per image when the processor is built here.
        image_size: ``(width, height)`` of every image.
        images_per_example: Images in the (single) user turn.
        prompt_words: Random words in the question.
        answer_words: Random words in the supervised answer.
        seed: Base seed.
        distinct_examples: Encode only this many distinct examples and cycle them (example ``i`` is example
            ``i % distinct_examples``), each encoded once and kept: a benchmark then does no image processing
            inside its timed steps. ``None``: every example is distinct and encoded when read.
    """

    def __init__(
        self,
        num_examples: int = 64,
        processor: Phi3VProcessor | None = None,
        num_crops: int = 4,
        image_size: tuple[int, int] = (CROP_SIZE, CROP_SIZE),
        images_per_example: int = 1,
        prompt_words: int = 8,
        answer_words: int = 4,
        seed: int = 0,
        distinct_examples: int | None = None,
    ) -> None:
        self.num_examples = num_examples
        self.processor = processor or Phi3VProcessor.tiny(num_crops=num_crops)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.images_per_example = images_per_example
        self.prompt_words = prompt_words
        self.answer_words = answer_words
        self.seed = seed
        self.distinct_examples = distinct_examples
        self._encoded: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.num_examples

    def _image(self, rng: np.random.Generator) -> Image.Image:
        # 8×8 colour blocks scaled up: cheap to make, not constant (so CLIP features differ between images).
        blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        return Image.fromarray(blocks).resize(self.image_size, Image.NEAREST)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        if self.distinct_examples is None:
            return self._encode(index)
        key = index % self.distinct_examples
        if key not in self._encoded:
            self._encoded[key] = self._encode(key)
        return self._encoded[key]

    def encode(self, index: int) -> dict[str, Any]:
        """Encode example ``index`` afresh (image rendering, HD transform, tokenization; the cache is not used)."""
        return self._encode(index)

    def _encode(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        words = random.Random(f"{self.seed}-{index}")
        turn = {
            "user": " ".join(words.choices(_WORDS, k=self.prompt_words)) + "?",
            "assistant": " ".join(words.choices(_WORDS, k=self.answer_words)),
            "images": [self._image(rng) for _ in range(self.images_per_example)],
        }
        return self.processor.encode_conversation([turn], where=f"synthetic[{index}]")


def synthetic_dataset(**kwargs: Any) -> SyntheticDataset:
    """Factory for the launcher's ``data`` section (keyword arguments of :class:`SyntheticDataset`)."""
    if "image_size" in kwargs:
        kwargs["image_size"] = tuple(kwargs["image_size"])
    return SyntheticDataset(**kwargs)
