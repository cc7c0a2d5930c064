"""Trainer callbacks: exact per-step timing for the benchmark and a loss guard.

``StepTimer`` is what ``bench`` attaches to measure training: wall time per optimizer step (device-synchronized on
CUDA), the step's loss, learning rate and gradient norm, and how many samples, tokens and images the step consumed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from phi3v_core.errors import Phi3VError
from phi3v_core.io import modes_from_umask
from phi3v_core.training.checkpoints import write_manifest

__all__ = [
    "MAX_SKIPPED_IN_ROW",
    "CheckpointManifest",
    "LossGuard",
    "StepMeter",
    "StepRecord",
    "StepTimer",
    "TrainingDivergedError",
    "loss_scale",
    "optimizer_step_skipped",
]

logger = logging.getLogger(__name__)

#: Consecutive loss-scaler-skipped steps after which :class:`LossGuard` stops. Each skip halves the scale: torch's
#: GradScaler needs 16 skips to go from its initial 2**16 down to 1. DeepSpeed's dynamic scaler with our
#: ``hysteresis: 2`` (deepspeed_config.py) only delays the *first* halving - the first overflow spends the hysteresis,
#: every later one in the run halves (the counter is reset only after a clean scale window) - so 17; past that the
#: gradients overflow even unscaled, which no further halving fixes. 50 leaves room for both and for larger initial
#: scales, and is still a few seconds of a real run, not hours.
MAX_SKIPPED_IN_ROW = 50


class TrainingDivergedError(Phi3VError):
    """The training loss is not finite, an applied gradient was not, the loss scaler skipped too many steps in a
    row, or the first loss is not positive (nothing supervised)."""


def optimizer_step_skipped(optimizer: Any) -> bool:
    """Whether the optimizer step that just ran was skipped by an fp16 loss scaler (gradients overflowed).

    ``optimizer`` is what the Trainer hands its callbacks: accelerate's ``AcceleratedOptimizer``
    (``step_was_skipped`` is set when torch's GradScaler skipped the step) or its DeepSpeed wrapper (the same
    property reads DeepSpeed's ``overflow`` flag). The same signal the Trainer uses
    (``accelerator.optimizer_step_was_skipped``) to hold back the learning-rate schedule.
    """
    if optimizer is None:
        return False
    try:
        skipped = getattr(optimizer, "step_was_skipped", None)
        if skipped is None:  # a bare DeepSpeed fp16 optimizer
            skipped = getattr(getattr(optimizer, "optimizer", None), "overflow", False)
        return bool(skipped)
    except Exception:  # noqa: BLE001 - an optimizer without overflow tracking never skips
        return False


def loss_scale(optimizer: Any) -> float | None:
    """The fp16 loss scale now in use (torch's GradScaler via accelerate, or DeepSpeed's), ``None`` without one."""
    scaler = getattr(optimizer, "scaler", None)
    try:
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        inner = getattr(optimizer, "optimizer", None)
        for owner in (inner, getattr(inner, "loss_scaler", None)):
            value = getattr(owner, "cur_scale", None)
            if value is not None:
                return float(value)
    except Exception:  # noqa: BLE001 - the scale is only reported, never needed
        return None
    return None


@dataclass
class StepMeter:
    """Counts what the micro-batches of the current optimizer step contain (this process only).

    The trainer feeds it from ``training_step``; counts that live on the device are summed as tensors and read
    once at the end of the step, so metering adds no host-device sync inside the step. ``data_wait_s`` is set by the
    trainer's batch fetch, which runs *before* ``on_step_begin`` (the Trainer prefetches a step's micro-batches), so
    :meth:`reset` leaves it alone.
    """

    samples: int = 0
    data_wait_s: float = 0.0
    images: int = 0
    micro_batches: int = 0
    #: Tokens the model computed, padding included (rows × width of every micro-batch).
    computed_tokens: int = 0
    _tokens: torch.Tensor | int = 0
    _supervised: torch.Tensor | int = 0

    def reset(self) -> None:
        """Start a new optimizer step."""
        self.samples = self.images = self.micro_batches = self.computed_tokens = 0
        self._tokens = self._supervised = 0

    def add(self, inputs: dict[str, Any]) -> None:
        """Count one micro-batch (collator output; a packed one carries its :class:`PackInfo` as ``packing``)."""
        input_ids = inputs["input_ids"]
        packing = inputs.get("packing")
        self.samples += packing.samples if packing is not None else int(input_ids.shape[0])
        self.micro_batches += 1
        self.images += len(inputs.get("image_sizes") or ())
        self.computed_tokens += int(input_ids.numel())
        mask = inputs.get("attention_mask")
        if packing is not None:
            self._tokens = self._tokens + packing.real_tokens
        else:
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
        computed_tokens: Tokens the model computed in the step, padding included (``tokens`` of them are real).
        images: Images of this process in the step.
        data_wait_seconds: Time this process waited for the step's micro-batches from the data loader (the
            Trainer fetches them before the step's clock starts; the device idles meanwhile, as the previous step
            ended with a synchronisation). Not part of ``seconds``; part of ``wall_seconds``.
        skipped: The fp16 loss scaler skipped the step's optimizer update (gradients overflowed): the step ran
            forward and backward but did not change the weights.
        began: ``time.perf_counter()`` when the step's clock started (orders the clock against other callbacks).
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
    data_wait_seconds: float = 0.0
    skipped: bool = False
    computed_tokens: int = 0
    began: float = 0.0

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
        record = StepRecord(
            step=state.global_step, seconds=now - self._begin, wall_seconds=now - self._last_end, began=self._begin
        )
        record.skipped = optimizer_step_skipped(kwargs.get("optimizer"))
        if self.meter is not None:
            record.samples = self.meter.samples
            record.images = self.meter.images
            record.tokens = self.meter.tokens
            record.supervised_tokens = self.meter.supervised_tokens
            record.data_wait_seconds = self.meter.data_wait_s
            record.computed_tokens = self.meter.computed_tokens
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
    """Stop with a clear error when training has diverged; let an fp16 loss scaler do its job.

    With fp16 the loss scaler skips the optimizer step whenever the scaled gradients overflow - by design at the
    start and every time the scale grows - and the logged gradient norm of that step is inf. Such a step is counted
    and logged (:attr:`skipped_steps`), not treated as divergence. The guard stops on

    * a non-finite loss;
    * a non-finite gradient norm on a step the optimizer *applied* (no scaler skipped it: the weights are now
      non-finite too);
    * :data:`MAX_SKIPPED_IN_ROW` skipped steps in a row (the gradients overflow whatever the scale);
    * a first loss of 0 or below: nothing is supervised (labels all -100). Later zeros are allowed: a model can fit
      a tiny dataset to fp32 precision.

    The Trainer logs before it saves a checkpoint, so a diverged step never reaches a checkpoint (with the default
    ``logging_steps=1`` every step is checked).

    Attributes:
        max_skipped_in_row: The consecutive-skip limit (default :data:`MAX_SKIPPED_IN_ROW`).
        skipped_steps: Global steps (1-based) whose update the loss scaler skipped, in order.
        skipped_in_row: Length of the current run of skipped steps.
    """

    def __init__(self, max_skipped_in_row: int | None = None) -> None:
        self._checked_first = False
        self.max_skipped_in_row = MAX_SKIPPED_IN_ROW if max_skipped_in_row is None else max_skipped_in_row
        self.skipped_steps: list[int] = []
        self.skipped_in_row = 0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        if not optimizer_step_skipped(optimizer):
            self.skipped_in_row = 0
            return
        self.skipped_steps.append(state.global_step)
        self.skipped_in_row += 1
        scale = loss_scale(optimizer)
        scale_text = f"{scale:g}" if scale is not None else "unknown"
        logger.warning(
            "step %d: the fp16 loss scaler skipped the update (gradients overflowed; loss scale now %s); "
            "%d skipped so far, %d in a row",
            state.global_step, scale_text, len(self.skipped_steps), self.skipped_in_row,
        )
        if self.skipped_in_row >= self.max_skipped_in_row:
            raise TrainingDivergedError(
                f"the fp16 loss scaler skipped {self.skipped_in_row} steps in a row (up to step {state.global_step}, "
                f"loss scale now {scale_text}): the gradients overflow at any scale; lower the learning rate, "
                "use bf16 where the GPU has it (compute capability 8.0+), or check the data"
            )

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
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"training loss is {loss} at step {state.global_step}; lower the learning rate, use bf16 instead of "
                "fp16, or check the data (a batch without supervised tokens gives 0/0)"
            )
        grad_norm = logs.get("grad_norm")
        skipped = bool(self.skipped_steps) and self.skipped_steps[-1] == state.global_step
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and not skipped:
            raise TrainingDivergedError(
                f"gradient norm is {float(grad_norm)} at step {state.global_step} and the optimizer applied it (no "
                "loss scaler skipped the step); nothing was saved for this step: lower the learning rate or check "
                "the data"
            )
        if not self._checked_first:
            self._checked_first = True
            if loss <= 0:
                raise TrainingDivergedError(
                    f"training loss is {loss} at step {state.global_step}; no token is supervised (all labels -100?)"
                )


class CheckpointManifest(TrainerCallback):
    """Write :data:`~phi3v_core.training.checkpoints.CHECKPOINT_MANIFEST` into each checkpoint once the Trainer saved everything (on the main process).

    Ranks meet at a barrier first so every rank's files (``rng_state_<rank>.pth``) are on disk when the manifest lists
    them.
    """

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write the manifest of ``checkpoint-<global_step>``."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                modes_from_umask(folder)  # safetensors writes 0600; the user's umask decides
                write_manifest(folder, state.global_step)
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
