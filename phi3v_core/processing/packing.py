"""Packing: several training samples, with their images, in one row of a micro-batch — computed exactly as unpacked.

A padded micro-batch computes ``samples × longest`` tokens; a packed one places the micro-batch's samples into as few
rows of ``pack_tokens`` as first-fit-decreasing finds (default budget: the longest sample, so a packed row is never
longer than the padded batch's rows), and only the rows' tails are padding. What keeps every sample's loss and
gradients equal to training it alone:

* position ids restart at 0 for every sample (and for the padding at a row's end, which forms its own segment);
  transformers reads the restarts as packed sequences: sdpa and eager get a block-diagonal causal mask
  (``masking_utils.find_packed_sequence_indices``), flash-attention-2 variable-length sequences. For FA2 all samples
  go into one flattened row with ``cu_seq_lens`` given, the layout transformers' varlen path needs (batch size 1);
* LongRoPE picks its short or long factors per sample from that sample's length (:class:`PackInfo` carries the
  lengths; the model's rotary embedding reads them), not from the row's length;
* the label at each sample's first position is ignored: unpacked nothing predicts it, packed the previous sample's
  last token would. The Trainer's ``num_items_in_batch`` (labels ≠ -100 after the shift) then counts the same
  supervised tokens as unpacked;
* images keep their order along the row-major token order, so each image's features fill its own placeholders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from phi3v_core.errors import ConfigError, DataError
from phi3v_core.first_fit import pack_rows
from phi3v_core.processing.collator import IGNORE_INDEX, Phi3VDataCollator

__all__ = ["PackInfo", "PackingCollator"]


@dataclass(frozen=True)
class PackInfo:
    """What a packed micro-batch holds: the sample lengths of each row, and the row width.

    Attributes:
        rows: Per row, the token counts of its samples in row order (the padding at the row's end excluded).
        width: Tokens per row as computed (the longest row, rounded up to ``pad_to_multiple_of``).
    """

    rows: tuple[tuple[int, ...], ...]
    width: int

    @property
    def samples(self) -> int:
        """Samples in the micro-batch."""
        return sum(len(row) for row in self.rows)

    @property
    def real_tokens(self) -> int:
        """Tokens of the samples (image placeholders included)."""
        return sum(sum(row) for row in self.rows)

    @property
    def computed_tokens(self) -> int:
        """Tokens the model computes: rows × width, padding included."""
        return len(self.rows) * self.width

    def long_rope_tokens(self, limit: int) -> torch.Tensor:
        """(rows, width) bool: positions of samples longer than ``limit`` (LongRoPE's long factors apply there)."""
        mask = torch.zeros(len(self.rows), self.width, dtype=torch.bool)
        for row_index, lengths in enumerate(self.rows):
            start = 0
            for length in lengths:
                if length > limit:
                    mask[row_index, start : start + length] = True
                start += length
        return mask


@dataclass
class PackingCollator:
    """Pack encoded training examples into rows (see the module docstring for why the result equals unpacked).

    Each example is validated (and optionally truncated) by ``base`` alone, then the examples are packed.

    Attributes:
        base: The padding collator whose checks and settings (pad id, ``max_length``, ``truncate``,
            ``pad_to_multiple_of``) apply; must pad on the right.
        pack_tokens: Tokens per row; ``None`` = the micro-batch's longest sample (never longer than padding's rows).
        flatten: All samples in one row without a budget (flash-attention-2's variable-length layout), with
            ``cu_seq_lens_q/k`` and ``max_length_q/k`` in the batch so no layer has to derive them on the device.
    """

    base: Phi3VDataCollator
    pack_tokens: int | None = None
    flatten: bool = False

    def __post_init__(self) -> None:
        if self.base.padding_side != "right":
            raise ConfigError("packing pads rows on the right; build the base collator with padding_side='right'")
        if self.pack_tokens is not None and (isinstance(self.pack_tokens, bool) or self.pack_tokens < 1):
            raise ConfigError(f"pack_tokens must be a positive number of tokens (got {self.pack_tokens!r})")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``examples`` into packed rows.

        Returns:
            ``input_ids``, ``labels`` and ``position_ids`` (rows, width) long, ``pixel_values`` and ``image_sizes`` in
            row-major sample order (as the padding collator emits them), ``packing`` (:class:`PackInfo`), and for a
            flattened batch ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k``. No ``attention_mask``: the position
            ids carry the sample boundaries.

        Raises:
            DataError: An inconsistent example, an example without labels, or one longer than ``pack_tokens``.
        """
        if not examples:
            raise DataError("cannot collate an empty list of examples")
        singles = [self.base([example]) for example in examples]  # the padding collator's checks, per example
        if any("labels" not in single for single in singles):
            raise DataError("packing is for training: every example needs labels")
        lengths = [int(single["input_ids"].shape[1]) for single in singles]
        budget = sum(lengths) if self.flatten else (self.pack_tokens or max(lengths))
        too_long = [(i, n) for i, n in enumerate(lengths) if n > budget]
        if too_long:
            index, length = too_long[0]
            raise DataError(
                f"example {index} has {length} tokens, more than --pack_tokens {budget}; raise --pack_tokens "
                "to at least the longest sample or leave it out (the default is the longest sample)"
            )
        if self.flatten:
            rows, width = [list(range(len(lengths)))], sum(lengths)
        else:
            rows, width = pack_rows(lengths, budget)
        if self.base.pad_to_multiple_of:
            width = -(-width // self.base.pad_to_multiple_of) * self.base.pad_to_multiple_of
        batch = self._rows(singles, rows, width)
        batch["packing"] = PackInfo(rows=tuple(tuple(lengths[i] for i in row) for row in rows), width=width)
        if self.flatten:
            bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            if width > bounds[-1]:  # padding to a multiple forms one more sequence
                bounds = torch.cat([bounds, torch.tensor([width], dtype=torch.int32)])
            longest = int((bounds[1:] - bounds[:-1]).max())
            batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
        return batch

    def _rows(self, singles: list[dict[str, Any]], rows: list[list[int]], width: int) -> dict[str, Any]:
        """The packed tensors of ``rows`` (indices into ``singles``), each row padded to ``width``."""
        input_ids = torch.full((len(rows), width), self.base.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        pixel_values: list[torch.Tensor] = []
        image_sizes: list[tuple[int, int]] = []
        for row_index, row in enumerate(rows):
            start = 0
            for index in row:
                single = singles[index]
                length = int(single["input_ids"].shape[1])
                span = slice(start, start + length)
                input_ids[row_index, span] = single["input_ids"][0]
                labels[row_index, span] = single["labels"][0]
                # Unpacked, nothing predicts a sample's first label; packed, the previous sample's last token would.
                labels[row_index, start] = IGNORE_INDEX
                position_ids[row_index, span] = torch.arange(length)
                if "pixel_values" in single:
                    pixel_values.append(single["pixel_values"])
                image_sizes.extend(single["image_sizes"])
                start += length
            # The padding restarts its positions too: a segment of its own, so no sample attends to it.
            position_ids[row_index, start:] = torch.arange(width - start)
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if pixel_values:
            shapes = {tuple(p.shape[1:]) for p in pixel_values}
            if len(shapes) > 1:
                raise DataError("examples' pixel_values differ in shape; process the whole dataset with one num_crops")
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)
        batch["image_sizes"] = image_sizes
        return batch
