"""Phi-3(.5)-vision processor: text with ``<|image_k|>`` tags + images -> ``input_ids`` with image placeholders.

Reference behaviour kept on purpose (the checkpoint's processing_phi3_v.py; the CookBook scripts' datasets and collators):

* The text is split on ``<|image_k|>`` tags and every chunk is tokenized on its own **with** the tokenizer's special
  tokens, so a BOS (``<s>``, id 1) starts the prompt *and follows every image*. The official weights were fine-tuned
  and evaluated this way, so it is the default; ``bos_after_image=False`` tokenizes the chunks after an image without
  special tokens (the first chunk of each prompt still gets its BOS).
* Tag ``<|image_k|>`` becomes ``num_img_tokens[k-1]`` copies of the negative id ``-k``; the tag text never reaches
  the tokenizer. Tags must be exactly ``<|image_1|>..<|image_n|>``, once each, in order, with ``n`` = number of images
  (the model fills placeholder runs with images in order of appearance, so anything else would silently mix them up).
* Training examples are built per turn like the CookBook's NLVR2/UCF-101 datasets: chat-template prompt with the
  generation prompt, processor call (BOS per turn), then ``f"{answer}<|end|>\\n<|endoftext|>"`` tokenized without
  special tokens; prompt positions get label -100.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase

from phi3v_core.errors import ConfigError, DataError, raise_all
from phi3v_core.io import atomic_write_json
from phi3v_core.processing.collator import IGNORE_INDEX, Phi3VDataCollator
from phi3v_core.processing.image_processing import ImageInput, Phi3VImageProcessor
from phi3v_core.processing.tokenizer import PAD_TOKEN_ID, build_tiny_tokenizer, load_tokenizer

__all__ = ["IMAGE_TAG_PATTERN", "Phi3VProcessor", "image_tags"]

#: An image tag in prompt text: ``<|image_1|>``, ``<|image_2|>``, ...
IMAGE_TAG_PATTERN = re.compile(r"<\|image_(\d+)\|>")
PROCESSOR_CONFIG = "processor_config.json"
#: Appended to every training answer (the CookBook scripts' datasets): end of turn, newline, end of text.
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"


def image_tags(count: int) -> str:
    """The tag prefix the recipe puts before a user message: ``<|image_1|>...<|image_n|>\\n`` (empty for 0)."""
    return "".join(f"<|image_{k}|>" for k in range(1, count + 1)) + "\n" if count else ""


def _is_single_image(value: Any) -> bool:
    return isinstance(value, (Image.Image, str, os.PathLike, np.ndarray))


class Phi3VProcessor:
    """Tokenizer + image processor with the reference placeholder layout.

    Args:
        image_processor: The ``Phi3VImageProcessor`` (decides ``num_crops``).
        tokenizer: A Phi-3 tokenizer (``load_tokenizer`` or ``build_tiny_tokenizer``).
        bos_after_image: Start every text chunk after an image with BOS like the reference (default True).
    """

    def __init__(
        self,
        image_processor: Phi3VImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        bos_after_image: bool = True,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.bos_after_image = bos_after_image

    def __repr__(self) -> str:
        return (
            f"Phi3VProcessor(num_crops={self.num_crops}, bos_after_image={self.bos_after_image}, "
            f"tokenizer={type(self.tokenizer).__name__})"
        )

    @property
    def num_crops(self) -> int:
        """Maximum number of 336² crops per image."""
        return self.image_processor.num_crops

    @property
    def pad_token_id(self) -> int:
        """Padding id (``<|endoftext|>``, 32000, for Phi-3)."""
        pad = self.tokenizer.pad_token_id
        return PAD_TOKEN_ID if pad is None else int(pad)

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, num_crops: int | None = None, bos_after_image: bool | None = None
    ) -> Phi3VProcessor:
        """Load tokenizer and image processor from a checkpoint (or ``save_pretrained``) folder, offline.

        Args:
            folder: Folder with ``tokenizer.json`` and ``preprocessor_config.json``; ``"tiny"`` (when no such folder
                exists) gives ``Phi3VProcessor.tiny()``.
            num_crops: Override of the folder's ``num_crops`` (recipe: 16 for documents, 4 for video/multi-image).
            bos_after_image: Override of ``processor_config.json``'s value (default True).

        Returns:
            The processor.

        Raises:
            ConfigError: If the folder is missing or incomplete, or ``num_crops`` is out of range.
        """
        path = Path(folder)
        if str(folder) == "tiny" and not path.exists():
            return cls.tiny(
                num_crops=4 if num_crops is None else num_crops, bos_after_image=bos_after_image is not False
            )
        if not path.is_dir():
            raise ConfigError(f"processor folder not found: {path} (pass a Phi-3-vision checkpoint folder)")
        saved: dict[str, Any] = {}
        if (path / PROCESSOR_CONFIG).is_file():
            try:
                saved = json.loads((path / PROCESSOR_CONFIG).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{path / PROCESSOR_CONFIG}: invalid JSON ({exc})") from exc
        if bos_after_image is None:
            bos_after_image = bool(saved.get("bos_after_image", True)) if isinstance(saved, dict) else True
        image_processor = Phi3VImageProcessor.from_pretrained(path, num_crops=num_crops)
        return cls(image_processor, load_tokenizer(path), bos_after_image=bos_after_image)

    @classmethod
    def tiny(cls, num_crops: int = 4, bos_after_image: bool = True) -> Phi3VProcessor:
        """Processor with the offline tiny tokenizer (official special tokens/ids) for tests and the tiny model.

        Args:
            num_crops: Maximum crops per image.
            bos_after_image: See the class docstring.

        Returns:
            The processor.
        """
        return cls(Phi3VImageProcessor(num_crops=num_crops), build_tiny_tokenizer(), bos_after_image=bos_after_image)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer files, ``preprocessor_config.json`` and ``processor_config.json`` into ``folder``.

        Files are written to a temporary folder first and moved in one by one (``os.replace``), so no file is left
        half-written.

        Args:
            folder: Destination (created if needed).

        Returns:
            The folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".processor-") as staging:
            self.tokenizer.save_pretrained(staging)
            self.image_processor.save_pretrained(staging)
            atomic_write_json(
                Path(staging) / PROCESSOR_CONFIG,
                {"processor_class": "Phi3VProcessor", "bos_after_image": self.bos_after_image},
            )
            for item in Path(staging).iterdir():
                os.replace(item, folder / item.name)
        return folder

    # ------------------------------------------------------------------ reference-compatible call
    def __call__(
        self,
        text: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput] | None] | None = None,
        *,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Encode one prompt (reference behaviour) or a batch of prompts.

        Args:
            text: A prompt with ``<|image_k|>`` tags, or a list of prompts.
            images: For one prompt: an image or a list of images (one per tag). For a batch: one list (or None) per
                prompt.
            padding_side: Batch padding: ``"right"`` (training) or ``"left"`` (generation); default: the
                tokenizer's (``"right"``).
            return_tensors: Only ``"pt"`` (or None, treated the same) is supported.

        Returns:
            ``BatchFeature`` with ``input_ids`` (B, L), ``attention_mask`` (B, L) (1 on real tokens), and, when there
            are images, ``pixel_values`` (N, num_crops+1, 3, 336, 336) and ``image_sizes`` LongTensor (N, 2).

        Raises:
            DataError: For tag/image mismatches or unreadable images.
        """
        if return_tensors not in ("pt", None):
            raise ConfigError(f"return_tensors must be 'pt' (got {return_tensors!r})")
        if isinstance(text, str):
            texts = [text]
            if images is None:
                per_text: list[list[ImageInput]] = [[]]
            elif _is_single_image(images):
                per_text = [[images]]  # type: ignore[list-item]
            else:
                per_text = [list(images)]  # type: ignore[arg-type]
        else:
            texts = list(text)
            if not texts or not all(isinstance(item, str) for item in texts):
                raise DataError("text must be a string or a non-empty list of strings")
            if images is None:
                per_text = [[] for _ in texts]
            else:
                images = list(images)  # type: ignore[arg-type]
                if len(images) != len(texts) or any(_is_single_image(item) for item in images):
                    raise DataError(
                        f"for a batch of {len(texts)} texts pass images as one list (or None) per text "
                        f"(got {len(images)} entries)"
                    )
                per_text = [[] if item is None else list(item) for item in images]  # type: ignore[union-attr]
        examples = [self._encode_prompt_text(item, imgs) for item, imgs in zip(texts, per_text)]
        collator = Phi3VDataCollator(
            pad_token_id=self.pad_token_id, padding_side=padding_side or self.tokenizer.padding_side
        )
        batch = collator(examples)
        data: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "pixel_values" in batch:
            data["pixel_values"] = batch["pixel_values"]
            data["image_sizes"] = torch.tensor(batch["image_sizes"], dtype=torch.long)
        return BatchFeature(data=data)

    def _encode_prompt_text(self, text: str, images: Sequence[ImageInput]) -> dict[str, Any]:
        """One prompt -> ``input_ids`` (1-D) with placeholders, ``pixel_values``, ``image_sizes``."""
        _check_tags([int(match) for match in IMAGE_TAG_PATTERN.findall(text)], len(images))  # before decoding images
        pixel_values, image_sizes, tokens = self._process_images(images)
        ids = self._text_to_ids(text, tokens)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
        }

    def _process_images(
        self, images: Sequence[ImageInput]
    ) -> tuple[torch.Tensor | None, list[tuple[int, int]], list[int]]:
        if not images:
            return None, [], []
        features = self.image_processor(list(images))
        sizes = [(int(h), int(w)) for h, w in features["image_sizes"].tolist()]
        return features["pixel_values"], sizes, list(features["num_img_tokens"])

    def _text_to_ids(self, text: str, num_img_tokens: Sequence[int], tag_offset: int = 0, where: str = "") -> list[int]:
        """Tokenize ``text`` chunk by chunk and expand its image tags into placeholder runs.

        Args:
            text: Prompt text.
            num_img_tokens: Placeholder count of each image of this text, in order.
            tag_offset: Conversation-wide number of the images before this text: tag ``k`` emits id
                ``-(k + tag_offset)`` (0 for a single prompt, as in the reference).
            where: Prefix for error messages (e.g. ``"train.jsonl:12: "``).

        Returns:
            Token ids with negative placeholder ids.
        """
        numbers = [int(match) for match in IMAGE_TAG_PATTERN.findall(text)]
        _check_tags(numbers, len(num_img_tokens), where)
        chunks = IMAGE_TAG_PATTERN.split(text)[::2]  # split() also returns the captured numbers at odd positions
        if self.bos_after_image:
            encoded = self.tokenizer(chunks, add_special_tokens=True)["input_ids"]
        else:
            encoded = [self.tokenizer(chunks[0], add_special_tokens=True)["input_ids"]]
            if len(chunks) > 1:
                encoded += self.tokenizer(chunks[1:], add_special_tokens=False)["input_ids"]
        ids: list[int] = list(encoded[0])
        for number, chunk_ids in zip(numbers, encoded[1:]):
            ids.extend([-(number + tag_offset)] * num_img_tokens[number - 1])
            ids.extend(chunk_ids)
        return ids

    # ------------------------------------------------------------------ chat template / training / generation
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Render messages with the Phi-3 chat template (``<|role|>\\ncontent<|end|>\\n`` ...).

        Args:
            messages: ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``.
            add_generation_prompt: Append ``<|assistant|>\\n`` when the last message is not the assistant's.
            tokenize: Return token ids instead of text (plain tokenization: image tags are NOT expanded; use
                ``__call__`` for that).
            **kwargs: Passed to the tokenizer's ``apply_chat_template``.

        Returns:
            The rendered string (or ids with ``tokenize=True``).
        """
        return self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs
        )

    def encode_conversation(self, turns: Sequence[Mapping[str, Any]], where: str = "") -> dict[str, Any]:
        """Encode a (multi-turn) conversation for training, turn by turn like the recipe.

        Each turn: its user text (``<|image_1|>...<|image_n|>\\n`` prepended when it has images but no tags) goes
        through the chat template with the generation prompt and the reference processor call; then
        ``f"{assistant}<|end|>\\n<|endoftext|>"`` is tokenized without special tokens. Prompt positions get label -100,
        answer positions (incl. ``<|end|>``, ``\\n``, ``<|endoftext|>``) are supervised.

        Image tags in a turn are numbered ``1..n`` for that turn's images, or conversation-wide (continuing after
        the previous turns' images); placeholder ids are conversation-wide (``-1, -2, ...``).

        Args:
            turns: ``[{"user": str, "assistant": str, "images": [image, ...]}, ...]`` (``images`` optional).
            where: Location for error messages, e.g. ``"data/train.jsonl:12"``.

        Returns:
            ``input_ids`` LongTensor (L,), ``labels`` LongTensor (L,), ``pixel_values``
            (n_img, num_crops+1, 3, 336, 336) or None, ``image_sizes`` list of ``(H, W)``.

        Raises:
            DataError: For malformed turns, tag/image mismatches or unreadable images.
        """
        return self._encode_turns(turns, where=where, final_prompt=False)

    def encode_prompt(
        self,
        turns_or_user_text: str | Sequence[Mapping[str, Any]],
        images: ImageInput | Sequence[ImageInput] | None = None,
        where: str = "",
    ) -> dict[str, Any]:
        """Encode a generation prompt ending with ``<|assistant|>`` (its ``\\n`` is swallowed by the tokenizer).

        Args:
            turns_or_user_text: A user message, or conversation turns. Earlier turns are encoded exactly like
                training turns (answer + ``<|end|>\\n<|endoftext|>``); the last turn's ``assistant`` (if present, e.g.
                a ground-truth answer) is ignored: it is what the model should generate.
            images: Images of the user message (only with a string).
            where: Location for error messages.

        Returns:
            ``input_ids`` LongTensor (L,), ``pixel_values`` or None, ``image_sizes`` list of ``(H, W)``.

        Raises:
            DataError: For malformed input, tag/image mismatches or unreadable images.
        """
        if isinstance(turns_or_user_text, str):
            if images is None:
                image_list: list[ImageInput] = []
            else:
                image_list = [images] if _is_single_image(images) else list(images)  # type: ignore[list-item, arg-type]
            turns: Sequence[Mapping[str, Any]] = [{"user": turns_or_user_text, "images": image_list}]
        else:
            if images is not None:
                raise DataError("pass images inside the turns when encoding a conversation (images= is for a string)")
            turns = turns_or_user_text
        encoded = self._encode_turns(turns, where=where, final_prompt=True)
        del encoded["labels"]
        return encoded

    def _encode_turns(self, turns: Sequence[Mapping[str, Any]], where: str, final_prompt: bool) -> dict[str, Any]:
        prefix = f"{where}: " if where else ""
        _validate_turns(turns, prefix, final_prompt)
        # Pass 1: prompts and tag checks for every turn, before any image is decoded.
        prompts: list[tuple[str, int, str]] = []  # (rendered prompt, images in this turn, error prefix)
        all_images: list[ImageInput] = []
        for index, turn in enumerate(turns):
            turn_images = turn.get("images") or []
            turn_images = [turn_images] if _is_single_image(turn_images) else list(turn_images)
            user = turn["user"]
            numbers = [int(match) for match in IMAGE_TAG_PATTERN.findall(user)]
            if turn_images and not numbers:
                user = image_tags(len(turn_images)) + user
            elif all_images and numbers and min(numbers) > len(all_images):
                # Conversation-wide numbering (<|image_3|> in turn 2): renumber to this turn's 1..n.
                user = _renumber_tags(user, len(all_images))
            turn_where = f"{prefix}turn {index + 1}: " if len(turns) > 1 else prefix
            _check_tags([int(match) for match in IMAGE_TAG_PATTERN.findall(user)], len(turn_images), turn_where)
            prompt = self.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
            prompts.append((prompt, len(turn_images), turn_where))
            all_images.extend(turn_images)
        pixel_values, image_sizes, tokens = self._process_images(all_images)

        # Pass 2: token ids; prompts are masked, answers supervised.
        input_ids: list[int] = []
        labels: list[int] = []
        offset = 0
        for index, (prompt, count, turn_where) in enumerate(prompts):
            prompt_ids = self._text_to_ids(prompt, tokens[offset : offset + count], tag_offset=offset, where=turn_where)
            offset += count
            input_ids.extend(prompt_ids)
            labels.extend([IGNORE_INDEX] * len(prompt_ids))
            if final_prompt and index == len(prompts) - 1:
                break
            answer = f"{turns[index]['assistant']}{ANSWER_SUFFIX}"
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            input_ids.extend(answer_ids)
            labels.extend(answer_ids)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
        }

    # ------------------------------------------------------------------ decoding
    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Decode rows of token ids (image placeholders, i.e. negative ids, are dropped).

        Args:
            sequences: (B, L) tensor or list of id lists.
            skip_special_tokens: Drop special tokens (the recipe's evaluation does).
            **kwargs: Passed to the tokenizer (``clean_up_tokenization_spaces`` defaults to False).

        Returns:
            One string per row.
        """
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in sequences]

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Decode one sequence of ids (negative placeholder ids are dropped).

        Args:
            token_ids: 1-D tensor or list of ids.
            skip_special_tokens: Drop special tokens.
            **kwargs: Passed to the tokenizer.

        Returns:
            The text.
        """
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        ids = [int(token) for token in token_ids if int(token) >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


def _renumber_tags(text: str, offset: int) -> str:
    """Shift every ``<|image_k|>`` tag in ``text`` down by ``offset``."""
    return IMAGE_TAG_PATTERN.sub(lambda match: f"<|image_{int(match.group(1)) - offset}|>", text)


def _check_tags(numbers: Sequence[int], n_images: int, where: str = "") -> None:
    """Validate image tag numbers (in order of appearance) against the number of images."""
    expected = list(range(1, n_images + 1))
    if list(numbers) == expected:
        return
    tags = ", ".join(f"<|image_{n}|>" for n in numbers) or "none"
    fix = "use one tag per image, numbered <|image_1|>..<|image_n|> in order"
    if len(numbers) != n_images:
        raise DataError(
            f"{where}text has {len(numbers)} image tag(s) ({tags}) but {n_images} image(s) were given; {fix}"
        )
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        raise DataError(f"{where}image tag <|image_{duplicates[0]}|> appears more than once ({tags}); {fix}")
    if sorted(numbers) != expected:
        raise DataError(f"{where}image tags must be numbered 1..{n_images} (got {tags}); {fix}")
    raise DataError(f"{where}image tags must appear in order (got {tags}); {fix}")


def _validate_turns(turns: Any, prefix: str, final_prompt: bool) -> None:
    """Check the structure of conversation turns, reporting every problem at once."""
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence) or not turns:
        raise DataError(f"{prefix}conversation must be a non-empty list of turns")
    problems = []
    for index, turn in enumerate(turns):
        name = f"{prefix}turn {index + 1}"
        if not isinstance(turn, Mapping):
            problems.append(f"{name} must be a mapping with 'user', 'assistant' and optional 'images'")
            continue
        if not isinstance(turn.get("user"), str):
            problems.append(f"{name}: 'user' must be a string")
        needs_answer = not (final_prompt and index == len(turns) - 1)
        if needs_answer and not isinstance(turn.get("assistant"), str):
            problems.append(f"{name}: 'assistant' must be a string")
        images = turn.get("images")
        if images is not None and not _is_single_image(images) and not isinstance(images, Sequence):
            problems.append(f"{name}: 'images' must be a list of images or paths")
    raise_all(problems, DataError)
