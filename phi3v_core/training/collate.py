"""Collation for training: the processor's collator, optionally trimming logits to the supervised span."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SupervisedLogitsCollator"]


@dataclass
class SupervisedLogitsCollator:
    """Wrap a collator so the model computes logits only where the loss needs them.

    The batch gets ``logits_to_keep = L - first`` and ``labels[:, first:]``, where ``first`` is the earliest position
    whose logits predict a supervised label in any row. The model's shifted loss then pairs exactly the same
    (logit, label) couples as on the full sequence, so loss and gradients are unchanged, while the vocabulary
    projection skips the prompt and the image placeholders. Computed on the host, so no device sync is added.

    Attributes:
        collate: The wrapped collator (``Phi3VDataCollator``).
    """

    collate: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        labels = batch.get("labels")
        if labels is None:
            return batch
        # Logits at position t predict label t+1; keep positions from the first one that predicts a real label.
        predicts_label = (labels[:, 1:] != -100).any(dim=0).nonzero()
        if predicts_label.numel() == 0:
            return batch  # nothing supervised: let the loss guard report it
        first = int(predicts_label[0])
        batch["labels"] = labels[:, first:]
        batch["logits_to_keep"] = labels.shape[1] - first
        return batch
