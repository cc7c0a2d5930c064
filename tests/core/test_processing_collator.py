"""Data collator: padding sides, attention mask from lengths, images, truncation and errors."""

from __future__ import annotations

import re

import pytest
import torch

from phi3v_core.errors import ConfigError, DataError
from phi3v_core.processing import Phi3VDataCollator

EOT = 32000


def example(ids: list[int], answer_from: int | None = None, n_images: int = 0, crops: int = 2) -> dict:
    """A hand-made encoded example; labels supervise ``ids[answer_from:]``."""
    out: dict = {"input_ids": torch.tensor(ids)}
    if answer_from is not None:
        out["labels"] = torch.tensor([-100] * answer_from + ids[answer_from:])
    out["pixel_values"] = torch.rand(n_images, crops, 3, 4, 4) if n_images else None
    out["image_sizes"] = [(336 * (k + 1), 336) for k in range(n_images)]
    return out


def test_right_padding_keeps_real_endoftext_attended() -> None:
    short = example([1, -1, -1, 1, 5, 32001, 7, 32007, 13, EOT], answer_from=6, n_images=1)
    long = example([1, 32010, 5, 5, 5, 5, 32001, 8, 9, 32007, 13, EOT, 1, 32010, 6, 32001, 7, EOT], answer_from=7)
    batch = Phi3VDataCollator()([short, long])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 18)
    assert batch["input_ids"][0].tolist() == short["input_ids"].tolist() + [EOT] * 8
    assert batch["labels"][0].tolist() == short["labels"].tolist() + [-100] * 8
    assert batch["attention_mask"].tolist() == [[1] * 10 + [0] * 8, [1] * 18]
    # The reference mask (ids != pad) would hide the real <|endoftext|> tokens, including one mid-sequence.
    reference_mask = (batch["input_ids"] != EOT).long()
    assert reference_mask[0, 9] == 0 and reference_mask[1, 11] == 0 and reference_mask[1, 17] == 0
    assert batch["labels"][0, 9] == EOT  # and it is supervised
    assert batch["image_sizes"] == [(336, 336)]
    assert all(isinstance(v, int) for pair in batch["image_sizes"] for v in pair)
    assert torch.equal(batch["pixel_values"], short["pixel_values"])


def test_left_padding_for_generation() -> None:
    first = example([1, -1, -1, 1, 32001], n_images=1)
    second = example([1, -1, -1, 1, -2, -2, -2, 1, 5, 32001], n_images=2)
    batch = Phi3VDataCollator(padding_side="left")([first, second])
    assert "labels" not in batch
    assert batch["input_ids"][0].tolist() == [EOT] * 5 + [1, -1, -1, 1, 32001]
    assert batch["attention_mask"][0].tolist() == [0] * 5 + [1] * 5
    assert batch["pixel_values"].shape[0] == 3
    assert torch.equal(batch["pixel_values"][0], first["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1:], second["pixel_values"])
    assert batch["image_sizes"] == [(336, 336), (336, 336), (672, 336)]


def test_no_images_key_absent_and_processor_rows_accepted() -> None:
    batch = Phi3VDataCollator()([{"input_ids": torch.tensor([[1, 5, 6]])}, {"input_ids": [1, 7]}])
    assert "pixel_values" not in batch and batch["image_sizes"] == []
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, EOT]]


def test_pad_to_multiple_and_keep_keys() -> None:
    rows = [dict(example([1, 2, 3], answer_from=1), answer="x"), dict(example([1, 2], answer_from=1), answer="y")]
    batch = Phi3VDataCollator(pad_to_multiple_of=8, keep_keys=("answer",))(rows)
    assert batch["input_ids"].shape == (2, 8) and batch["answer"] == ["x", "y"]
    assert "answer" not in Phi3VDataCollator()(rows)


def test_max_length_check_and_safe_truncation() -> None:
    long = example([1, -1, -1, 1, 5, 6, 7, 8], answer_from=4, n_images=1)
    message = (
        "example 0 has 8 tokens, more than max_length=6; raise max_length, lower num_crops or use fewer/smaller images"
    )
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        Phi3VDataCollator(max_length=6)([long])
    batch = Phi3VDataCollator(max_length=6, truncate=True)([long])
    assert batch["input_ids"].tolist() == [[1, -1, -1, 1, 5, 6]] and batch["labels"].tolist() == [[-100] * 4 + [5, 6]]
    message = (
        "example 0 has 8 tokens; truncating to max_length=2 would cut through an image; "
        "raise max_length, lower num_crops or use fewer/smaller images"
    )
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        Phi3VDataCollator(max_length=2, truncate=True)([long])


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([example([1, 2], 1), example([1, 2])], "some examples have labels and some do not; collate training and prompt examples apart"),
        ([{"input_ids": [1, 2], "labels": [1]}], "example 0: labels have 1 tokens but input_ids 2"),
        ([example([1, 5], n_images=1)], "example 0: 0 image placeholder runs in input_ids but 1 images; encode examples with Phi3VProcessor"),
        ([{"input_ids": [1, -1], "pixel_values": torch.zeros(1, 2, 3, 4, 4), "image_sizes": []}], "example 0: 1 images in pixel_values but 0 image_sizes"),
        ([example([1, -1], n_images=1, crops=2), example([1, -1], n_images=1, crops=3)], "example 1: pixel_values shape (3, 3, 4, 4) differs from (2, 3, 4, 4); process the whole dataset with one num_crops"),
        ([{"input_ids": []}], "example 0: input_ids must be a non-empty 1-D sequence (got shape (0,))"),
        ([], "cannot collate an empty list of examples"),
    ],
)  # fmt: skip
def test_inconsistent_examples(examples, message) -> None:
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        Phi3VDataCollator()(examples)


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"^padding_side must be 'right' or 'left' \(got 'middle'\); max_length"):
        Phi3VDataCollator(padding_side="middle", max_length=0)
