"""The benchmark's training data: the core synthetic dataset sized to a sequence profile.

Every example has the profile's images (noise of the profile's size, so the processor derives the same HD crop grid
as a real page would) and about the profile's number of text tokens. The examples are
:class:`phi3v_core.training.synthetic.SyntheticDataset`'s (one implementation for training smoke runs and
benchmarks); a few distinct ones are encoded up front and then cycled, so no image processing happens inside timed
steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from bench.config import BenchConfig
from phi3v_core.constants import CROP_SIZE, SeqProfile
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training.synthetic import SyntheticDataset

__all__ = ["SyntheticWorkload", "build_workload"]

_DISTINCT_EXAMPLES = 4
#: Word counts of the two probes that measure the tokens per word (the answer gets ¼ of the words, the prompt the rest).
_PROBE_WORDS = (4, 16)


@dataclass
class SyntheticWorkload:
    """What the job trains on (the Trainer's sampler shards the dataset over the ranks).

    Attributes:
        dataset: Map-style dataset of encoded examples: the global batch for every planned optimizer step.
        tokens_per_sample: Non-padding tokens of one example (image placeholders included).
        image_tokens_per_sample: Image placeholder tokens of one example.
        images_per_sample: Images in one example.
        supervised_tokens_per_sample: Positions of one example that predict a label (where training computes logits).
    """

    dataset: Dataset
    tokens_per_sample: int
    image_tokens_per_sample: int
    images_per_sample: int
    supervised_tokens_per_sample: int = 0


def _dataset(
    processor: Phi3VProcessor, profile: SeqProfile, seed: int, words: int, length: int, probe: bool = False
) -> SyntheticDataset:
    # A probe counts text tokens only, which do not depend on the image size: one crop's worth of pixels is enough.
    return SyntheticDataset(
        num_examples=length,
        processor=processor,
        image_size=(CROP_SIZE, CROP_SIZE) if probe else (profile.image_width, profile.image_height),
        images_per_example=profile.images_per_sample,
        prompt_words=max(1, words - words // 4),
        answer_words=max(1, words // 4),
        seed=seed,
        distinct_examples=_DISTINCT_EXAMPLES,
    )


def _mean_text_tokens(processor: Phi3VProcessor, profile: SeqProfile, seed: int, words: int) -> float:
    """Mean non-image tokens of the distinct examples with ``words`` words."""
    probe = _dataset(processor, profile, seed, words, _DISTINCT_EXAMPLES, probe=True)
    counts = [
        int(ex["input_ids"].numel()) - int((ex["input_ids"] < 0).sum())
        for ex in map(probe.__getitem__, range(len(probe)))
    ]
    return sum(counts) / len(counts)


def build_workload(cfg: BenchConfig, processor: Phi3VProcessor, num_samples: int) -> SyntheticWorkload:
    """Encode the profile's examples and return a dataset of ``num_samples`` of them.

    The number of words is calibrated once against the processor's tokenizer (two probes give the tokens per word
    and the fixed chat tags and special tokens), so that the examples carry about ``profile.text_tokens`` non-image
    tokens on average.
    """
    profile = cfg.profile
    low, high = (_mean_text_tokens(processor, profile, cfg.seed, w) for w in _PROBE_WORDS)
    per_word = max(1.0, (high - low) / (_PROBE_WORDS[1] - _PROBE_WORDS[0]))
    words = max(1, round(_PROBE_WORDS[0] + (profile.text_tokens - low) / per_word))
    dataset = _dataset(processor, profile, cfg.seed, words, num_samples)
    examples = [dataset[i] for i in range(min(_DISTINCT_EXAMPLES, num_samples))]  # encoded now, not in a timed step
    ids = examples[0]["input_ids"]
    return SyntheticWorkload(
        dataset=dataset,
        tokens_per_sample=int(ids.numel()),
        image_tokens_per_sample=int((ids < 0).sum()),
        images_per_sample=profile.images_per_sample,
        supervised_tokens_per_sample=int((examples[0]["labels"][1:] != -100).sum()),
    )
