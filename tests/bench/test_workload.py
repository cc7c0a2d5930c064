"""The benchmark's workload is the core synthetic dataset, sized to a sequence profile."""

from __future__ import annotations

import pytest

from bench.config import BenchConfig
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training.synthetic import SyntheticDataset
from phi3v_core.training.workload import build_workload


@pytest.mark.parametrize("profile", ["docvqa", "nlvr2"])
def test_workload_matches_the_profile_and_cycles_encoded_examples(profile: str) -> None:
    cfg = BenchConfig(model="tiny", seq_profile=profile, num_crops=1)
    workload = build_workload(cfg, Phi3VProcessor.tiny(num_crops=1), 10)
    dataset = workload.dataset
    assert isinstance(dataset, SyntheticDataset) and len(dataset) == 10
    # Four distinct examples, encoded once and then cycled: no image processing inside a timed step.
    assert dataset[5] is dataset[1] and dataset[0] is not dataset[1]
    texts = [int((dataset[i]["input_ids"] >= 0).sum()) for i in range(4)]
    assert abs(sum(texts) / 4 - cfg.profile.text_tokens) <= 6, texts  # words calibrated to the profile's text
    images = dataset[0]["pixel_values"].shape[0]
    assert images == workload.images_per_sample == cfg.profile.images_per_sample
    assert workload.tokens_per_sample == dataset[0]["input_ids"].numel()


def test_distinct_examples_off_encodes_every_index() -> None:
    dataset = SyntheticDataset(3, num_crops=1)
    assert dataset[0] is not dataset[0]  # encoded on each read, as the launcher's smoke runs always did
    assert dataset[1]["input_ids"].tolist() == dataset[1]["input_ids"].tolist()
