"""EncodedDataset / PromptDataset: lazy encoding through the processor contract (fake and real tiny processor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from phi3v_core.data import EncodedDataset, PromptDataset, load_task, record_image_tokens
from phi3v_core.errors import DataError


class FakeProcessor:
    """Records what it is given; returns a minimal encoded example."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def encode_conversation(self, turns: list[dict[str, Any]], where: str = "") -> dict[str, Any]:
        self.calls.append(("conversation", turns, where))
        n_images = sum(len(t["images"]) for t in turns)
        return {"input_ids": torch.arange(3 + n_images), "labels": torch.arange(3 + n_images), "n_images": n_images}

    def encode_prompt(self, turns_or_user_text: Any, images: Any = None, where: str = "") -> dict[str, Any]:
        self.calls.append(("prompt", turns_or_user_text, images, where))
        return {"input_ids": torch.arange(2)}


def test_encoded_dataset_is_lazy_and_passes_decoded_turns() -> None:
    task = load_task("nlvr2", synthetic=3)
    processor = FakeProcessor()
    dataset = EncodedDataset(task.train, processor)
    assert len(dataset) == 3 and processor.calls == []  # nothing encoded up front
    example = dataset[1]
    kind, turns, where = processor.calls[0]
    record = task.train[1]
    assert kind == "conversation" and where == f"record {record.id!r}"
    assert [t["user"] for t in turns] == [t.user for t in record.conversations]
    assert [t["assistant"] for t in turns] == [t.assistant for t in record.conversations]
    images = turns[0]["images"]
    assert all(isinstance(img, Image.Image) and img.mode == "RGB" for img in images)
    assert [img.size for img in images] == [src.size for src in record.conversations[0].images]
    assert example["n_images"] == 2 and all(t["images"] == [] for t in turns[1:])
    assert dataset.image_tokens(16) == [record_image_tokens(r, 16) for r in task.train]


def test_encoded_dataset_rejects_objects_without_the_contract() -> None:
    with pytest.raises(TypeError, match="processor must have encode_conversation"):
        EncodedDataset([], object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="processor must have encode_prompt"):
        PromptDataset([], object())  # type: ignore[arg-type]


def test_prompt_dataset_single_question_and_context() -> None:
    task = load_task("nlvr2", synthetic=2)
    processor = FakeProcessor()
    first_only = PromptDataset(task.eval_items(), processor)
    first_only[0]
    kind, user, images, where = processor.calls[-1]
    assert kind == "prompt" and user == task.eval[0].conversations[0].user and len(images) == 2
    assert where == f"eval item {task.eval[0].id!r}"
    assert first_only.references == [[r.conversations[0].assistant] for r in task.eval]

    with_context = PromptDataset(task.eval_items(all_turns=True), processor)
    second = with_context[1]  # second question of the first record
    kind, turns, images, _ = processor.calls[-1]
    assert second["input_ids"].tolist() == [0, 1] and images is None
    assert [t["user"] for t in turns] == [t.user for t in task.eval[0].conversations[:2]]
    assert turns[0]["assistant"] == task.eval[0].conversations[0].assistant and "assistant" not in turns[1]


def test_file_images_are_checked_again_when_decoded(tmp_path: Path) -> None:
    task = load_task("hateful_memes", synthetic=1, synthetic_eval=1)
    task.write(tmp_path / "memes")
    loaded = load_task("hateful_memes", data_dir=tmp_path / "memes")
    image_path = loaded.train[0].conversations[0].images[0]
    image_path.write_bytes(b"broken after validation")
    with pytest.raises(DataError, match=f"^{image_path}: not a readable image"):
        EncodedDataset(loaded.train, FakeProcessor())[0]


def test_real_tiny_processor_and_collator_round_trip() -> None:
    import phi3v_core.processing as processing
    task = load_task("hateful_memes", synthetic=2)
    processor = processing.Phi3VProcessor.tiny(num_crops=1)
    dataset = EncodedDataset(task.train, processor)
    example = dataset[0]
    # Placeholder count equals the image-token arithmetic used for sequence-length profiles.
    assert int((example["input_ids"] < 0).sum()) == record_image_tokens(task.train[0], 1) == 313
    assert example["pixel_values"].shape == (1, 2, 3, 336, 336)
    loader = DataLoader(
        dataset, batch_size=2, collate_fn=processing.Phi3VDataCollator(pad_token_id=processor.pad_token_id)
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    prompt = PromptDataset(task.eval_items(), processor)[0]
    assert "labels" not in prompt and int((prompt["input_ids"] < 0).sum()) == record_image_tokens(task.eval[0], 1)
