"""The uniform in-memory record type every task loader produces.

A :class:`Record` is one training/eval example: an id, a source tag and a list of :class:`Turn` (multi-turn). Each turn
carries the user text *as sent to the processor* (image tags included), the assistant target, the images of that turn
and, for evaluation, every accepted reference answer.

Images are kept lazy: a turn holds a :class:`pathlib.Path` (file-backed data), a :class:`LazyImage` (synthetic twins,
Hugging Face rows) or an already decoded ``PIL.Image``. :func:`load_image` turns any of them into an RGB image, and
:func:`image_size` reads the size without decoding pixels, so sequence-length statistics stay cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image

from phi3v_core.data.images import DEFAULT_MAX_PIXELS, open_image

__all__ = [
    "IMAGE_TAG_RE",
    "ImageSource",
    "LazyImage",
    "Record",
    "Turn",
    "image_size",
    "image_tag_problem",
    "image_tags",
    "load_image",
    "with_image_tags",
]

#: The processor's image tag: ``<|image_k|>`` with k counted from 1 inside each turn.
IMAGE_TAG_RE = re.compile(r"<\|image_(\d+)\|>")
# Tag spellings of other formats (LLaVA / the Cauldron / a missing number) that the processor would treat as plain text.
_FOREIGN_TAG_RE = re.compile(r"<image>|<\|image\|>|<image_\d+>|<\|image_\|>")


@dataclass(frozen=True)
class LazyImage:
    """An image produced on demand by ``loader`` (a picklable callable, so DataLoader workers can use it).

    Attributes:
        loader: Zero-argument callable returning a ``PIL.Image``; called on every :meth:`load`.
        size: ``(width, height)`` when known without decoding (synthetic images), else ``None``.
        name: Stable, human-readable name used in messages and when the image is written to disk.
    """

    loader: Callable[[], Image.Image]
    size: tuple[int, int] | None = None
    name: str = "image"

    def load(self) -> Image.Image:
        """Return the decoded image (rendered afresh each call; nothing is cached to keep memory flat)."""
        return self.loader()


ImageSource = Union[Image.Image, Path, LazyImage]


@dataclass
class Turn:
    """One user → assistant exchange.

    Attributes:
        user: User message content as the processor receives it; when the turn has images it holds one
            ``<|image_k|>`` tag per image (k = 1..n within the turn).
        assistant: Training target (no ``<|end|>``; the processor appends the end tokens).
        images: Images of this turn, in tag order.
        answers: All accepted answers for evaluation; empty means ``[assistant]``.
    """

    user: str
    assistant: str
    images: list[ImageSource] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    @property
    def references(self) -> list[str]:
        """Ground-truth answers used by the metrics (``answers`` or, if empty, the assistant target)."""
        return list(self.answers) if self.answers else [self.assistant]

    def load_images(self, max_pixels: int | None = None) -> list[Image.Image]:
        """Decode this turn's images as RGB (see :func:`load_image`)."""
        return [load_image(src, max_pixels=max_pixels) for src in self.images]

    def as_processor_turn(self, max_pixels: int | None = None) -> dict[str, object]:
        """The dict shape ``Phi3VProcessor.encode_conversation`` takes: ``{"user", "assistant", "images"}``."""
        return {"user": self.user, "assistant": self.assistant, "images": self.load_images(max_pixels)}


@dataclass
class Record:
    """One example: ``{id, source, conversations}`` exactly as in the recipe's jsonl, with typed turns."""

    id: str
    source: str
    conversations: list[Turn]

    @property
    def images(self) -> list[ImageSource]:
        """All images of the record, turn by turn."""
        return [img for turn in self.conversations for img in turn.images]


def image_tags(num_images: int) -> str:
    """Return ``<|image_1|>...<|image_n|>`` concatenated without separators (the recipe's multi-image form)."""
    return "".join(f"<|image_{k}|>" for k in range(1, num_images + 1))


def with_image_tags(user: str, num_images: int) -> str:
    """Prepend ``<|image_1|>..<|image_n|>`` plus a newline when a turn has images but its text has no tags.

    This is the recipe's convention (UCF-101 jsonl stores the bare question; the training script prepends the tags).
    Text that already holds tags is returned unchanged; :func:`image_tag_problem` checks it.
    """
    if num_images == 0 or IMAGE_TAG_RE.search(user):
        return user
    return f"{image_tags(num_images)}\n{user}"


def image_tag_problem(user: str, num_images: int, prior_images: int = 0) -> str | None:
    """Describe what is wrong with the image tags of one turn, or return ``None`` when they are valid.

    Valid (the processor's rules): no tags at all (they get prepended), or ``<|image_1|>``..``<|image_n|>`` once
    each and in order, n being the number of images of *this* turn. Conversation-wide numbering, continuing after the
    ``prior_images`` of earlier turns (``<|image_3|>`` in a second turn), is accepted too; the processor renumbers it.

    Args:
        user: The turn's user text.
        num_images: Images of this turn.
        prior_images: Images of the earlier turns of the conversation.
    """
    foreign = _FOREIGN_TAG_RE.search(user)
    if foreign:
        return (
            f"contains {foreign.group(0)!r}, which the processor treats as plain text; "
            f"use <|image_1|>, <|image_2|>, ... (one per image of the turn) or no tags"
        )
    numbers = [int(m) for m in IMAGE_TAG_RE.findall(user)]
    if not numbers:
        return None
    per_turn = list(range(1, num_images + 1))
    if numbers == per_turn or (prior_images and numbers == [n + prior_images for n in per_turn]):
        return None
    found = "".join(f"<|image_{n}|>" for n in numbers)
    if num_images == 0:
        return f"has image tags {found} but the turn has no images; remove the tags or list the images"
    if num_images == 1:
        fix = "use <|image_1|> exactly once, or no tag to have it prepended"
    else:
        fix = f"use <|image_1|>..<|image_{num_images}|> once each, in order, or no tags to have them prepended"
    return f"has image tags {found} but the turn has {num_images} image{'s' if num_images > 1 else ''}; {fix}"


def load_image(src: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Decode any :data:`ImageSource` into an RGB ``PIL.Image``.

    Args:
        src: A path, a :class:`LazyImage` or an image.
        max_pixels: Decompression-bomb cap for file images (default: :data:`~phi3v_core.data.images.DEFAULT_MAX_PIXELS`).

    Returns:
        An RGB image.

    Raises:
        DataError: A file image is missing, unreadable, truncated or above the pixel cap.
    """
    if isinstance(src, Path):
        return open_image(src, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    image = src.load() if isinstance(src, LazyImage) else src
    return image if image.mode == "RGB" else image.convert("RGB")


def image_size(src: ImageSource) -> tuple[int, int]:
    """Return ``(width, height)`` of an image source, reading only the file header for paths."""
    if isinstance(src, Path):
        with Image.open(src) as im:
            return im.size
    if isinstance(src, LazyImage):
        return src.size if src.size is not None else src.load().size
    return src.size
