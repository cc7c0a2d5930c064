"""Where training computes ``lm_head`` and the loss, and what that costs (``TrainSetup.logits``).

``supervised`` (phi3v_core.model in training): only at the positions that predict a label, in chunks of
``LOSS_CHUNK_TOKENS`` (several chunks are each recomputed in backward); ``full``: at every position, as the recipe's
code does (the published rows the planner is calibrated on are planned so).
"""

from __future__ import annotations

from typing import Protocol

from phi3v_core.constants import LOSS_CHUNK_TOKENS
from planner.shapes import ModelShape

__all__ = ["LOGITS_MODES", "LogitsSetup", "TokenCounts", "logit_positions", "logits_loss_bytes"]

LOGITS_MODES = ("supervised", "full")


class TokenCounts(Protocol):
    """What this module reads of a :class:`planner.estimate.SampleShape` (which imports this module)."""

    seq_len: int
    supervised_tokens: int | None


class LogitsSetup(Protocol):
    """What this module reads of a :class:`planner.train_setup.TrainSetup`."""

    micro_batch: int
    logits: str
    logits_retained: bool


def logit_positions(workload: TokenCounts, logits: str) -> int:
    """Positions per sample where training computes ``lm_head`` and the loss (all when the answer length is unknown)."""
    if logits == "supervised" and workload.supervised_tokens is not None:
        return min(workload.supervised_tokens, workload.seq_len)
    return workload.seq_len


def logits_loss_bytes(shape: ModelShape, setup: LogitsSetup, workload: TokenCounts) -> float:
    """fp32 log-softmax output, its incoming grad and the logits' grad, alive in the loss backward (bytes).

    ``full``: every position of the micro-batch (plus the fp32 logits when the caller keeps them); ``supervised``: the
    labelled positions, at most one chunk at a time.
    """
    positions = setup.micro_batch * logit_positions(workload, setup.logits)
    if setup.logits == "supervised":
        return 12 * min(positions, LOSS_CHUNK_TOKENS) * shape.vocab_size
    return (12 + (4 if setup.logits_retained else 0)) * positions * shape.vocab_size
