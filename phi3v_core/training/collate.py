"""Collation for training: the processor's collator or packing, optionally trimming logits to the supervised span."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from phi3v_core.processing import PAD_TOKEN_ID, Phi3VDataCollator
from phi3v_core.processing.packing import PackingCollator

__all__ = ["SupervisedLogitsCollator", "training_collator"]


def training_collator(
    packing: bool = False, pack_tokens: int | None = None, attn: str = "sdpa", supervised_logits_only: bool = False
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """The collator a training run uses: right padding, or packing (one flattened row for flash-attention-2, whose
    variable-length kernel needs batch size 1; rows of ``pack_tokens`` with a block-diagonal mask otherwise)."""
    collator: Any = Phi3VDataCollator(pad_token_id=PAD_TOKEN_ID, padding_side="right")
    if packing:
        collator = PackingCollator(collator, pack_tokens=pack_tokens, flatten=attn == "flash_attention_2")
    if supervised_logits_only:
        collator = SupervisedLogitsCollator(collator)
    return collator


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
