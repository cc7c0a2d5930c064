"""Token lengths of a user's jsonl data folder (``phi3v-plan --data DIR``), without decoding a pixel or importing torch.

The folder is read by the same reader, with the same checks, as finetune and ``phi3v-convert check``
(:func:`phi3v_core.data.task_registry.read_task_split`: path rules, task rules, image headers only), so the planner
plans for exactly the data training will see, at the num_crops finetune would use. Image sizes come from the file
headers (EXIF orientation applied, as training sees them); image tokens and crops from
the processor's own HD arithmetic (:func:`planner.crops.sample_shape`: the rule :mod:`phi3v_core.constants`
shares with the image processor). Text tokens are an estimate (about four UTF-8 bytes
per token plus the chat template's tags) unless a tokenizer is given; the profile says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3v_core.data.task_registry import default_num_crops, read_task_split, task_of_folder
from phi3v_core.errors import DataError
from phi3v_core.fs import pending
from planner.crops import WeightedSample, envelope, mean_shape, sample_shape
from planner.estimate import SampleShape
from planner.shapes import ModelShape

__all__ = ["DataProfile", "Sample", "profile_data"]

#: Bytes of UTF-8 text per token for the estimate (Llama/Phi-3 SentencePiece on English: 3.5-4.5).
BYTES_PER_TOKEN = 4.0
#: Chat-template tokens per turn (``<|user|>``, ``<|end|>``, ``<|assistant|>``, newlines) and per sample (BOS, EOS).
TURN_TOKENS, SAMPLE_TOKENS = 8, 2


@dataclass(frozen=True)
class Sample:
    """One record: where it is, its images' sizes and its text tokens."""

    where: str
    image_sizes: tuple[tuple[int, int], ...]
    text_tokens: int
    record_id: str = ""

    def sample_shape(self, shape: ModelShape, num_crops: int) -> SampleShape:
        """Tokens and real crops of this sample at ``num_crops`` (the processor's arithmetic)."""
        return sample_shape(shape, self.image_sizes, self.text_tokens, num_crops)


@dataclass
class DataProfile:
    """Token-length distribution of a data folder at one ``num_crops``.

    Attributes:
        path: The jsonl file read.
        num_crops: The crop budget the lengths are for.
        samples: Every record.
        lengths: Sequence length of each sample (same order).
        text_estimated: True when text tokens are estimated (no tokenizer).
        mean_shape: The average sample (for speed).
        longest: Index of the longest sample.
        task: The task finetune trains the folder as (``--task``): ``jsonl``, or the task a converted folder is for.
        skipped: One message per record left out for a bad image file (``--skip_bad``).
    """

    path: Path
    num_crops: int
    samples: list[Sample]
    lengths: list[int]
    text_estimated: bool
    mean_shape: SampleShape
    longest: int
    stats: dict[str, float] = field(default_factory=dict)
    task: str = "jsonl"
    skipped: list[str] = field(default_factory=list)

    def weighted(self) -> list[WeightedSample]:
        """The samples as :class:`planner.crops.WeightedSample`, alike ones counted once with their number."""
        counts: dict[tuple[Any, ...], int] = {}
        for s in self.samples:
            key = (s.image_sizes, s.text_tokens)
            counts[key] = counts.get(key, 0) + 1
        return [WeightedSample(sizes, text, count) for (sizes, text), count in counts.items()]

    def largest(self, shape: ModelShape) -> SampleShape:
        """At least every sample's tokens, crops and images (:func:`planner.crops.envelope`): memory is planned for
        a micro-batch of it, so a layout that fits it fits every sample."""
        return envelope([s.sample_shape(shape, self.num_crops) for s in self.samples])

    def at_num_crops(self, shape: ModelShape, num_crops: int) -> DataProfile:
        """The same samples' lengths at another ``num_crops``."""
        return _summarize(self.path, self.samples, shape, num_crops, self.text_estimated, self.task, self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "path": str(self.path),
            "samples": len(self.samples),
            "num_crops": self.num_crops,
            "seq_len": self.stats,
            "text_tokens": "estimated (~4 bytes per token + chat tags)" if self.text_estimated else "tokenizer",
            "longest_sample": self.samples[self.longest].where,
            "skipped": self.skipped,
        }


def _percentile(sorted_values: list[int], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[index])


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def profile_data(
    data_dir: str | Path,
    shape: ModelShape,
    num_crops: int | None = None,
    split: str = "train",
    count_tokens: Callable[[str], int] | None = None,
    task: str | None = None,
    skip_bad: bool = False,
) -> DataProfile:
    """Read ``<data_dir>/*_<split>.jsonl`` and its image headers; lengths at ``num_crops``.

    Args:
        data_dir: The data folder.
        shape: Model shape (image tokens per crop).
        num_crops: Crop budget (default: the one finetune uses for this folder, e.g. 4 for a converted UCF-101 folder
            or any multi-frame custom folder, else 16).
        split: ``"train"`` or ``"val"``.
        count_tokens: A tokenizer's counter (default: an estimate).
        task: The task the folder is for (default: from its file name, ``ucf101_train.jsonl`` -> ``ucf101``, else
            ``jsonl``, the rules of any custom folder).
        skip_bad: Leave out records whose image files are missing or unreadable (``--skip_bad``, as finetune does)
            instead of failing; they are listed in :attr:`DataProfile.skipped`.

    Raises:
        DataError: Missing folder/file, or every problem ``phi3v-convert check`` would report (``file:line: what``).
    """
    folder = Path(data_dir)
    pending(folder, "--data")  # an interrupted replacement is reported, never repaired, by a command that only reads
    if not folder.is_dir():
        raise DataError(f"--data {folder}: not a folder; pass a folder holding <name>_train.jsonl and images/")
    task = task or task_of_folder(folder)
    result = read_task_split(
        task, folder, "eval" if split == "val" else "train", check_images="header", skip_bad=skip_bad, raise_errors=True
    )
    assert not isinstance(result, DataError)  # raise_errors=True raised it
    if num_crops is None:
        num_crops = default_num_crops(task, result.records)
    count = count_tokens or _estimate_tokens
    samples: list[Sample] = []
    for record, line in zip(result.records, result.lines, strict=True):
        images = tuple(result.image_sizes[p] for turn in record.conversations for p in turn.images)  # type: ignore[index]
        text = SAMPLE_TOKENS + sum(
            TURN_TOKENS + count(turn.user) + count(turn.assistant) for turn in record.conversations
        )
        samples.append(Sample(f"{result.path}:{line}", images, text, record.id))
    return _summarize(result.path, samples, shape, num_crops, count_tokens is None, task, list(result.skipped))


def _summarize(
    path: Path,
    samples: list[Sample],
    shape: ModelShape,
    num_crops: int,
    estimated: bool,
    task: str,
    skipped: list[str],
) -> DataProfile:
    workloads = [s.sample_shape(shape, num_crops) for s in samples]
    lengths = [w.seq_len for w in workloads]
    ordered = sorted(lengths)
    n = len(samples)
    longest = max(range(n), key=lengths.__getitem__)
    mean = sum(lengths) / n
    stats = {
        "mean": round(mean, 1),
        "p50": _percentile(ordered, 0.5),
        "p95": _percentile(ordered, 0.95),
        "max": float(ordered[-1]),
    }
    mean_sample = mean_shape(workloads, [1.0] * n, num_crops)
    return DataProfile(path, num_crops, samples, lengths, estimated, mean_sample, longest, stats, task, skipped)
