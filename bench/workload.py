"""Synthetic training data with a controlled sequence-length profile, encoded by the real processor.

Every example has the profile's images (random noise of the profile's size, so the processor derives the same HD
crop grid as a real page would) and roughly the profile's number of text tokens. A few distinct examples are
encoded once up front and then cycled, so no image processing happens inside timed steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from bench.config import BenchConfig, SeqProfile
from phi3v_core.processing import Phi3VProcessor

__all__ = ["Workload", "build_workload"]

_WORDS = "table total price invoice date name page figure chart value number amount street report".split()
_DISTINCT_EXAMPLES = 4


@dataclass
class Workload:
    """What the job trains on (the Trainer's sampler shards the dataset over the ranks).

    Attributes:
        dataset: Map-style dataset of encoded examples: the global batch for every planned optimizer step.
        tokens_per_sample: Non-padding tokens of one example (image placeholders included).
        image_tokens_per_sample: Image placeholder tokens of one example.
        images_per_sample: Images in one example.
    """

    dataset: Dataset
    tokens_per_sample: int
    image_tokens_per_sample: int
    images_per_sample: int


class _CycledExamples(Dataset):
    def __init__(self, examples: list[dict], length: int) -> None:
        self.examples = examples
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.examples[index % len(self.examples)]


def _encode(processor: Phi3VProcessor, profile: SeqProfile, seed: int, text_words: int) -> dict:
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, (profile.image_height, profile.image_width, 3), dtype=np.uint8))
        for _ in range(profile.images_per_sample)
    ]
    words = random.Random(seed)
    question = " ".join(words.choice(_WORDS) for _ in range(max(1, text_words * 3 // 4)))
    answer = " ".join(words.choice(_WORDS) for _ in range(max(1, text_words // 4)))
    return processor.encode_conversation([{"user": question, "assistant": answer, "images": images}])


def build_workload(cfg: BenchConfig, processor: Phi3VProcessor, num_samples: int) -> Workload:
    """Encode the profile's examples and return a dataset of ``num_samples`` of them.

    The number of text words is calibrated once against the processor's tokenizer so that an example carries
    about ``profile.text_tokens`` non-image tokens (chat tags and BOS included).
    """
    profile = cfg.profile
    probe = _encode(processor, profile, cfg.seed, text_words=4)
    image_tokens = int((probe["input_ids"] < 0).sum())
    probe_text = int(probe["input_ids"].numel()) - image_tokens
    fixed = _fixed_text_tokens(processor, profile, cfg.seed)  # encodes an image: compute once
    per_word = max(1.0, (probe_text - fixed) / 4)
    words = max(1, round((profile.text_tokens - fixed) / per_word))
    examples = [_encode(processor, profile, cfg.seed + i, words) for i in range(_DISTINCT_EXAMPLES)]
    tokens = int(examples[0]["input_ids"].numel())
    return Workload(
        dataset=_CycledExamples(examples, num_samples),
        tokens_per_sample=tokens,
        image_tokens_per_sample=image_tokens,
        images_per_sample=profile.images_per_sample,
    )


def _fixed_text_tokens(processor: Phi3VProcessor, profile: SeqProfile, seed: int) -> int:
    """Text tokens that do not depend on the word count (chat tags, BOS, end tokens), measured with 1+1 words."""
    example = _encode(processor, profile, seed, text_words=1)
    ids = example["input_ids"]
    # text_words=1 gives one question word and one answer word (max(1, ...)); subtract them at the measured rate.
    word_tokens = len(processor.tokenizer("table", add_special_tokens=False)["input_ids"]) * 2
    return int(ids.numel()) - int((ids < 0).sum()) - word_tokens
