"""Trainer callbacks: exact per-step timing for the benchmark and a loss guard.

``StepTimer`` is what ``bench`` attaches to measure training: wall time per optimizer step (device-synchronized on
CUDA), the step's loss, learning rate and gradient norm, and how many samples, tokens and images the step consumed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from phi3v_core.errors import Phi3VError

__all__ = ["LossGuard", "StepMeter", "StepRecord", "StepTimer", "TrainingDivergedError"]


class TrainingDivergedError(Phi3VError):
    """The training loss or gradient norm is not finite, or the first loss is not positive (nothing supervised)."""


@dataclass
class StepMeter:
    """Counts what the micro-batches of the current optimizer step contain (this process only).

    The trainer feeds it from ``training_step``; counts that live on the device are summed as tensors and read
    once at the end of the step, so metering adds no host-device sync inside the step.
    """

    samples: int = 0
    images: int = 0
    micro_batches: int = 0
    _tokens: torch.Tensor | int = 0
    _supervised: torch.Tensor | int = 0

    def reset(self) -> None:
        """Start a new optimizer step."""
        self.samples = self.images = self.micro_batches = 0
        self._tokens = self._supervised = 0

    def add(self, inputs: dict[str, Any]) -> None:
        """Count one micro-batch (collator output)."""
        input_ids = inputs["input_ids"]
        self.samples += int(input_ids.shape[0])
        self.micro_batches += 1
        self.images += len(inputs.get("image_sizes") or ())
        mask = inputs.get("attention_mask")
        self._tokens = self._tokens + (mask.sum() if mask is not None else input_ids.numel())
        labels = inputs.get("labels")
        if labels is not None:
            # Supervised positions after the causal shift, as the loss counts them.
            self._supervised = self._supervised + (labels[..., 1:] != -100).sum()

    @property
    def tokens(self) -> int:
        """Non-padding tokens (image placeholders included)."""
        return int(self._tokens)

    @property
    def supervised_tokens(self) -> int:
        """Tokens that contributed to the loss."""
        return int(self._supervised)


@dataclass
class StepRecord:
    """One optimizer step as seen by :class:`StepTimer`.

    Attributes:
        step: Global step number (1-based, continues after a resume).
        seconds: ``on_step_begin`` → ``on_step_end``: forward, backward and optimizer of all micro-batches
            (device-synchronized on CUDA). Excludes fetching the step's batches, which the Trainer prefetches.
        wall_seconds: Previous step end (or train start) → this step end: everything, data loading, logging and the
            previous step's checkpointing included.
        loss: The step's loss (token-weighted mean over all processes and micro-batches) when the step was logged.
        learning_rate: Learning rate used by the step (when logged).
        grad_norm: Gradient norm before clipping (when logged).
        samples: Examples this process consumed in the step.
        tokens: Non-padding tokens of this process in the step.
        supervised_tokens: Loss tokens of this process in the step.
        images: Images of this process in the step.
    """

    step: int
    seconds: float
    wall_seconds: float
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)


@dataclass
class StepTimer(TrainerCallback):
    """Record a :class:`StepRecord` per optimizer step.

    Attach it through ``train(..., callbacks=[timer])``; the trainer connects its :class:`StepMeter`. Losses are
    filled from the Trainer's log, so use ``logging_steps=1`` (the TrainConfig default) for a loss on every step.

    Attributes:
        synchronize: Call ``torch.cuda.synchronize()`` at step boundaries on CUDA so that times are exact rather
            than kernel-launch times.
        records: The collected steps.
        meter: Filled by the trainer; counts samples/tokens/images.
    """

    synchronize: bool = True
    records: list[StepRecord] = field(default_factory=list)
    meter: StepMeter | None = None
    _begin: float = 0.0
    _last_end: float = 0.0

    def _sync(self, args: TrainingArguments) -> None:
        if self.synchronize and args.device.type == "cuda":
            torch.cuda.synchronize(args.device)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._sync(args)
        self._last_end = time.perf_counter()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._sync(args)
        if self.meter is not None:
            self.meter.reset()
        self._begin = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._sync(args)
        now = time.perf_counter()
        record = StepRecord(step=state.global_step, seconds=now - self._begin, wall_seconds=now - self._last_end)
        if self.meter is not None:
            record.samples = self.meter.samples
            record.images = self.meter.images
            record.tokens = self.meter.tokens
            record.supervised_tokens = self.meter.supervised_tokens
        self.records.append(record)
        self._last_end = now

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # The Trainer logs right after on_step_end of the same step.
        if not logs or "loss" not in logs or not self.records or self.records[-1].step != state.global_step:
            return
        last = self.records[-1]
        last.loss = float(logs["loss"])
        last.learning_rate = logs.get("learning_rate")
        grad_norm = logs.get("grad_norm")
        last.grad_norm = float(grad_norm) if grad_norm is not None else None


class LossGuard(TrainerCallback):
    """Stop with a clear error when the logged loss or gradient norm is NaN/inf, or the first loss is zero/negative.

    The Trainer logs before it saves a checkpoint, so a diverged step never reaches a checkpoint (with the default
    ``logging_steps=1`` every step is checked).

    A non-finite loss means divergence (try a lower learning rate, bf16 instead of fp16, or gradient clipping). A
    first-step loss of 0 means nothing is supervised (labels all -100). Later zeros are allowed: a model can fit a
    tiny dataset to fp32 precision.
    """

    def __init__(self) -> None:
        self._checked_first = False

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        grad_norm = logs.get("grad_norm")
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise TrainingDivergedError(
                f"gradient norm is {float(grad_norm)} at step {state.global_step}; nothing was saved for this step: "
                "lower the learning rate, use bf16 instead of fp16, or check the data"
            )
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"training loss is {loss} at step {state.global_step}; lower the learning rate, use bf16 instead of "
                "fp16, or check the data (a batch without supervised tokens gives 0/0)"
            )
        if not self._checked_first:
            self._checked_first = True
            if loss <= 0:
                raise TrainingDivergedError(
                    f"training loss is {loss} at step {state.global_step}; no token is supervised (all labels -100?)"
                )
