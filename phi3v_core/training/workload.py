"""What a timed measurement trains: the synthetic workload sized to a sequence profile, and its ``TrainConfig``.

Used by ``phi3v-bench`` (whose :class:`~bench.config.BenchConfig` is a :class:`~phi3v_core.workload.Workload` plus
GPUs and protocol) and by ``phi3v-plan --validate`` (which passes a ``Workload``), so both time the same training steps
on the same data.

Every example has the profile's images (noise of the profile's size, so the processor derives the same HD crop grid
as a real page would) and about the profile's number of text tokens. The examples are
:class:`phi3v_core.training.synthetic.SyntheticDataset`'s (one implementation for training smoke runs and
benchmarks); a few distinct ones are encoded up front and then cycled, so no image processing happens inside timed
steps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch.utils.data import Dataset

from phi3v_core.constants import CROP_SIZE, SeqProfile, load_recipe
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training.config import TrainConfig
from phi3v_core.training.synthetic import SyntheticDataset
from phi3v_core.workload import Workload

__all__ = [
    "SyntheticWorkload", "build_workload", "recipe_learning_rate", "to_train_config",
]


def recipe_learning_rate(task: str, method: str) -> float:
    """The recipe's learning rate for ``task``/``method`` (its preset), else the recipe scripts' default (4e-5)."""
    recipe = load_recipe()
    preset = recipe.presets.get(f"{task}-{method}")
    if preset is not None and "learning_rate" in preset.values:
        return float(preset.values["learning_rate"])
    return float(recipe.recipe_defaults["learning_rate"])


#: Workload fields that are no ``TrainConfig`` field as they stand: the profile sizes the data, and a ``None`` learning
#: rate means the recipe's (:func:`recipe_learning_rate`).
_NOT_TRAIN_CONFIG = ("seq_profile", "learning_rate")


def to_train_config(cfg: Workload, output_dir: str, total_steps: int) -> TrainConfig:
    """The fine-tuning core's ``TrainConfig`` of a measured run: no warmup schedule, no saving, a log every step.

    The learning rate is the config's, else the recipe's for the profile's task and the method: it does not change
    the step time, but it decides how many weights a step changes (the run reports it, :mod:`bench.updates`).
    """
    # every workload field but the profile is a TrainConfig field of the same name: one map, by name
    shared = {f.name: getattr(cfg, f.name) for f in fields(Workload) if f.name not in _NOT_TRAIN_CONFIG}
    return TrainConfig(
        **shared,
        learning_rate=cfg.learning_rate or recipe_learning_rate(cfg.profile.name, cfg.method),
        max_steps=total_steps,
        warmup_steps=0,
        output_dir=output_dir,
        save_steps=0,
        save_final=False,
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


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


def build_workload(cfg: Workload, processor: Phi3VProcessor, num_samples: int) -> SyntheticWorkload:
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
