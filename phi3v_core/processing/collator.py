"""Batch collation for Phi-3-vision examples (training: right padding; generation: left padding).

Differences from the CookBook collators (the CookBook scripts' collators), on purpose:

* ``attention_mask`` comes from each example's real length. The reference uses ``input_ids != pad_token_id``, but
  Phi-3 pads with ``<|endoftext|>`` (32000), which is also the eos every answer ends with, so the reference masks the
  real ``<|endoftext|>`` tokens (even mid-sequence in multi-turn data).
* ``image_sizes`` is a python list of ``(H, W)`` ints, so the model needs no device-to-host sync to read it.
* Over-long examples raise a clear error instead of being cut silently (optionally truncated when no image is hit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from phi3v_core.errors import ConfigError, DataError

__all__ = ["IGNORE_INDEX", "Phi3VDataCollator"]

#: Label value ignored by the cross-entropy loss.
IGNORE_INDEX = -100


@dataclass
class Phi3VDataCollator:
    """Pad a list of encoded examples into one batch.

    Each example is a mapping with ``input_ids`` (1-D LongTensor / list, or ``(1, L)``), optional ``labels`` (same
    length), optional ``pixel_values`` ``(n_img, num_crops+1, 3, 336, 336)`` or None, and ``image_sizes`` (list of
    ``(H, W)`` or an ``(n_img, 2)`` tensor). Any ``attention_mask`` in an example is ignored: masks are rebuilt from
    lengths.

    Attributes:
        pad_token_id: Id written into padding positions (Phi-3: ``<|endoftext|>`` = 32000).
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
        label_pad: Label written into padding positions.
        max_length: If set, examples longer than this raise ``DataError`` (or are truncated, see ``truncate``).
        truncate: Cut over-long examples to ``max_length`` (right end) when the cut removes no image placeholder;
            otherwise (default) raise.
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 for tensor cores).
        keep_keys: Extra example keys to pass through as python lists (e.g. ``("answers",)`` for evaluation);
            everything else unknown is dropped so the Trainer can feed the batch straight to the model.
    """

    pad_token_id: int = 32000
    padding_side: str = "right"
    label_pad: int = IGNORE_INDEX
    max_length: int | None = None
    truncate: bool = False
    pad_to_multiple_of: int | None = None
    keep_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.padding_side not in ("right", "left"):
            problems.append(f"padding_side must be 'right' or 'left' (got {self.padding_side!r})")
        if self.max_length is not None and self.max_length < 1:
            problems.append(f"max_length must be >= 1 (got {self.max_length})")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            problems.append(f"pad_to_multiple_of must be >= 1 (got {self.pad_to_multiple_of})")
        if problems:
            raise ConfigError("; ".join(problems))

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate examples.

        Args:
            examples: Encoded examples (``Phi3VProcessor.encode_conversation`` / ``encode_prompt`` outputs).

        Returns:
            ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long, ``labels`` (B, L) long when the examples have
            labels, ``pixel_values`` (N_img, num_crops+1, 3, 336, 336) when any example has images (key absent
            otherwise), ``image_sizes`` list of ``(H, W)`` int tuples (empty without images), plus ``keep_keys``.

        Raises:
            DataError: For inconsistent or over-long examples.
        """
        if not examples:
            raise DataError("cannot collate an empty list of examples")
        input_ids = [self._as_1d(example["input_ids"], index, "input_ids") for index, example in enumerate(examples)]
        has_labels = ["labels" in example and example["labels"] is not None for example in examples]
        if any(has_labels) and not all(has_labels):
            raise DataError("some examples have labels and some do not; collate training and prompt examples apart")
        labels = (
            [self._as_1d(example["labels"], index, "labels") for index, example in enumerate(examples)]
            if all(has_labels)
            else None
        )
        pixel_values: list[torch.Tensor] = []
        image_sizes: list[tuple[int, int]] = []
        for index, example in enumerate(examples):
            ids = input_ids[index]
            if labels is not None and labels[index].shape != ids.shape:
                raise DataError(
                    f"example {index}: labels have {labels[index].numel()} tokens but input_ids {ids.numel()}"
                )
            sizes = self._image_sizes(example.get("image_sizes"))
            pixels = example.get("pixel_values")
            n_images = 0 if pixels is None else int(pixels.shape[0])
            if n_images != len(sizes):
                raise DataError(f"example {index}: {n_images} images in pixel_values but {len(sizes)} image_sizes")
            n_runs = _count_placeholder_runs(ids)
            if n_runs != n_images:
                raise DataError(
                    f"example {index}: {n_runs} image placeholder runs in input_ids but {n_images} images; "
                    "encode examples with Phi3VProcessor"
                )
            if pixels is not None:
                if pixel_values and pixels.shape[1:] != pixel_values[0].shape[1:]:
                    raise DataError(
                        f"example {index}: pixel_values shape {tuple(pixels.shape[1:])} differs from "
                        f"{tuple(pixel_values[0].shape[1:])}; process the whole dataset with one num_crops"
                    )
                pixel_values.append(pixels)
            image_sizes.extend(sizes)
            if self.max_length is not None and ids.numel() > self.max_length:
                input_ids[index], cut_labels = self._truncate(index, ids, None if labels is None else labels[index])
                if labels is not None:
                    labels[index] = cut_labels

        lengths = [ids.numel() for ids in input_ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {
            "input_ids": self._pad(input_ids, width, self.pad_token_id),
            "attention_mask": self._pad([torch.ones(n, dtype=torch.long) for n in lengths], width, 0),
        }
        if labels is not None:
            batch["labels"] = self._pad(labels, width, self.label_pad)
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)
        batch["image_sizes"] = image_sizes
        for key in self.keep_keys:
            batch[key] = [example.get(key) for example in examples]
        return batch

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _as_1d(values: Any, index: int, name: str) -> torch.Tensor:
        tensor = torch.as_tensor(values, dtype=torch.long)
        if tensor.dim() == 2 and tensor.shape[0] == 1:
            tensor = tensor[0]  # a single-row processor output (1, L)
        if tensor.dim() != 1 or tensor.numel() == 0:
            raise DataError(
                f"example {index}: {name} must be a non-empty 1-D sequence (got shape {tuple(tensor.shape)})"
            )
        return tensor

    @staticmethod
    def _image_sizes(sizes: Any) -> list[tuple[int, int]]:
        if sizes is None:
            return []
        if isinstance(sizes, torch.Tensor):
            sizes = sizes.tolist()
        return [(int(height), int(width)) for height, width in sizes]

    def _truncate(
        self, index: int, ids: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.max_length is not None
        hint = "raise max_length, lower num_crops or use fewer/smaller images"
        if not self.truncate:
            raise DataError(f"example {index} has {ids.numel()} tokens, more than max_length={self.max_length}; {hint}")
        if bool((ids[self.max_length :] < 0).any()):
            raise DataError(
                f"example {index} has {ids.numel()} tokens; truncating to max_length={self.max_length} would cut "
                f"through an image; {hint}"
            )
        return ids[: self.max_length], None if labels is None else labels[: self.max_length]

    def _pad(self, rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for row_index, row in enumerate(rows):
            if self.padding_side == "right":
                out[row_index, : row.numel()] = row
            else:
                out[row_index, width - row.numel() :] = row
        return out


def _count_placeholder_runs(ids: torch.Tensor) -> int:
    """Number of maximal runs of equal negative ids (one run per image)."""
    negative = ids < 0
    if not bool(negative.any()):
        return 0
    starts = negative.clone()
    starts[1:] &= ids[1:] != ids[:-1]
    return int(starts.sum())
