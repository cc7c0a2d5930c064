"""torch ``Dataset`` wrappers that encode records lazily with the processor.

Images are decoded (or rendered) inside ``__getitem__``, so DataLoader workers do the work in parallel and memory stays
flat. The processor is anything with the contract from CONTRACTS.md (``Phi3VProcessor``):
``encode_conversation(turns) -> dict`` for training and ``encode_prompt(turns_or_user_text, images) -> dict`` for
generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch.utils.data import Dataset

from phi3v_core.data.images import DEFAULT_MAX_PIXELS
from phi3v_core.data.records import Record, load_image
from phi3v_core.data.seqlen import record_image_tokens
from phi3v_core.data.tasks import EvalItem

__all__ = ["ConversationEncoder", "EncodedDataset", "PromptDataset", "PromptEncoder"]


@runtime_checkable
class ConversationEncoder(Protocol):
    """What :class:`EncodedDataset` needs from a processor."""

    def encode_conversation(self, turns: list[dict[str, Any]], where: str = "") -> dict[str, Any]:
        """Encode ``[{"user", "assistant", "images": [PIL.Image]}]`` into input_ids/labels/pixel_values/image_sizes.

        ``where`` names the example in error messages.
        """
        ...


@runtime_checkable
class PromptEncoder(Protocol):
    """What :class:`PromptDataset` needs from a processor."""

    def encode_prompt(self, turns_or_user_text: Any, images: Any = None, where: str = "") -> dict[str, Any]:
        """Encode a generation prompt ending with ``<|assistant|>`` (images only with a user string)."""
        ...


class EncodedDataset(Dataset):
    """Training dataset: ``dataset[i]`` is ``processor.encode_conversation(turns of records[i])``.

    Args:
        records: Records (e.g. ``load_task(...).train``).
        processor: Object with ``encode_conversation`` (a ``Phi3VProcessor``).
        max_pixels: Pixel cap applied again when file images are decoded.
    """

    def __init__(
        self, records: Sequence[Record], processor: ConversationEncoder, *, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        if not callable(getattr(processor, "encode_conversation", None)):
            raise TypeError(f"processor must have encode_conversation(turns), got {type(processor).__name__}")
        self.records = list(records)
        self.processor = processor
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def turns(self, index: int) -> list[dict[str, Any]]:
        """The processor input for record ``index``: ``[{"user", "assistant", "images": [PIL.Image]}]``."""
        return [turn.as_processor_turn(self.max_pixels) for turn in self.records[index].conversations]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.processor.encode_conversation(self.turns(index), where=f"record {self.records[index].id!r}")

    def image_tokens(self, num_crops: int) -> list[int]:
        """Image placeholder tokens per record, from image sizes only (no decoding); useful for length bucketing."""
        return [record_image_tokens(record, num_crops) for record in self.records]


class PromptDataset(Dataset):
    """Generation dataset: ``dataset[i]`` is ``processor.encode_prompt(...)`` of ``items[i]`` (no labels).

    ``items[i].references`` holds the accepted answers to score the generation of ``dataset[i]`` against; a question
    with earlier turns (``items[i].context``) is encoded as the list of turns ending with the question.

    Args:
        items: ``TaskData.eval_items()``.
        processor: Object with ``encode_prompt`` (a ``Phi3VProcessor``).
        max_pixels: Pixel cap for file images.
    """

    def __init__(self, items: Sequence[EvalItem], processor: PromptEncoder, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        if not callable(getattr(processor, "encode_prompt", None)):
            raise TypeError(
                f"processor must have encode_prompt(turns_or_user_text, images), got {type(processor).__name__}"
            )
        self.items = list(items)
        self.processor = processor
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    @property
    def references(self) -> list[list[str]]:
        """Accepted answers per item, aligned with the dataset order."""
        return [item.references for item in self.items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        images = [load_image(src, max_pixels=self.max_pixels) for src in item.images]
        where = f"eval item {item.id!r}"
        if not item.context:
            return self.processor.encode_prompt(item.user, images, where=where)
        # Earlier turns are encoded like training turns (with their answers); the last one is the question.
        turns = [turn.as_processor_turn(self.max_pixels) for turn in item.context]
        turns.append({"user": item.user, "images": images})
        return self.processor.encode_prompt(turns, where=where)
