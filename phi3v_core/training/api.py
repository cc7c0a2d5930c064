"""``train()``: the Python entry point the benchmark, the finetune CLI and the launcher call.

Order of work: validate everything (before touching a GPU or writing a file) → build the model → apply the method
→ HF Trainer with our collator → optional resume → final save (atomic per file) → :class:`TrainResult`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from phi3v_core.device import local_device
from phi3v_core.errors import ConfigError
from phi3v_core.fs import StorageError, describe_storage_error
from phi3v_core.io import atomic_write_json, modes_from_umask
from phi3v_core.methods import MethodReport
from phi3v_core.run_folder import COMPLETE_MARKER
from phi3v_core.training.callbacks import CheckpointManifest, LossGuard, StepRecord, StepTimer, TrainingDivergedError
from phi3v_core.training.checkpoints import checkpoint_problem, find_resumable_checkpoint
from phi3v_core.training.collate import training_collator
from phi3v_core.training.config import TrainConfig
from phi3v_core.training.levers import trainer_levers
from phi3v_core.training.machine import Machine
from phi3v_core.training.model_setup import build_model, prepare_model
from phi3v_core.training.trainer import Phi3VTrainer, build_training_arguments
from phi3v_core.transaction import move_into

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_MARKER",
    "TrainResult",
    "build_model",
    "init_distributed",
    "prepare_model",
    "resolve_resume",
    "train",
    "write_json_atomic",
]


@dataclass
class TrainResult:
    """What a run produced (every process gets one; files are written by the main process only).

    Attributes:
        output_dir: The run folder.
        global_step: Optimizer steps done in total (a resumed run counts the steps before the resume).
        losses: Step → logged loss, for every logged step including those restored from the checkpoint.
        train_loss: Mean logged loss of this invocation (Trainer's ``train_loss``).
        steps: Per-step timing/counts of this invocation (:class:`StepRecord`, this process).
        report: What the method did (trainable names and counts, LoRA targets, quantized modules).
        metrics: The Trainer's train metrics (``train_runtime``, ``train_samples_per_second``, ...).
        eval_metrics: ``trainer.evaluate()`` on ``eval_dataset`` after training, if one was given.
        resumed_from: The checkpoint this invocation resumed from.
        saved_to: Folder of the final model / adapter (``None`` when ``save_final`` is off).
        world_size: Processes that trained.
        zero_stage: The DeepSpeed ZeRO stage the engine really ran (2), or ``None`` without DeepSpeed.
        model: The trained model (a ``PeftModel`` for lora/qlora), unwrapped from DDP/DeepSpeed.
    """

    output_dir: Path
    global_step: int
    losses: dict[int, float]
    train_loss: float
    steps: list[StepRecord]
    report: MethodReport
    metrics: dict[str, float]
    eval_metrics: dict[str, float] | None
    resumed_from: Path | None
    saved_to: Path | None
    world_size: int
    zero_stage: int | None
    model: nn.Module = field(repr=False, default=None)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no model, no per-name parameter list)."""
        return {
            "output_dir": str(self.output_dir),
            "global_step": self.global_step,
            "losses": {str(k): v for k, v in self.losses.items()},
            "train_loss": self.train_loss,
            "steps": [s.to_dict() for s in self.steps],
            "method": self.report.method,
            "trainable_parameters": self.report.trainable_parameters,
            "total_parameters": self.report.total_parameters,
            "metrics": self.metrics,
            "eval_metrics": self.eval_metrics,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "saved_to": str(self.saved_to) if self.saved_to else None,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
        }


#: TrainConfig fields that change what a run computes: a resume must not change them.
RESULT_FIELDS = (
    "model", "method", "precision", "attn", "num_crops", "global_batch", "max_steps", "num_train_epochs",
    "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "lora_rank", "lora_alpha_ratio", "lora_dropout", "lora_lm_head", "freeze_vision", "seed",
    "supervised_logits_only", "vision_lr", "projector_lr", "freeze_llm",
)  # fmt: skip
#: ``extra`` keys that change the result (the data).
_RESULT_EXTRA = ("task", "data", "data_content")
#: The run's configuration inside each checkpoint.
CHECKPOINT_CONFIG = "train_config.json"


def _recorded_config(checkpoint: Path, output_dir: Path) -> dict[str, Any] | None:
    for path in (checkpoint / CHECKPOINT_CONFIG, output_dir / CHECKPOINT_CONFIG):
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(recorded, dict):
            return recorded
    return None


def config_diff(cfg: TrainConfig, recorded: dict[str, Any]) -> list[str]:
    """``name: old → new`` for every result-changing setting that differs from the recorded run."""
    current = cfg.to_dict()
    diff = []
    for name in RESULT_FIELDS:
        if name in recorded and recorded[name] != current.get(name):
            diff.append(f"{name} {recorded[name]!r} → {current.get(name)!r}")
    old_extra, new_extra = recorded.get("extra") or {}, current.get("extra") or {}
    for name in _RESULT_EXTRA:
        if name in old_extra and name in new_extra and old_extra[name] != new_extra[name]:
            if name == "data_content":  # two hashes say nothing to a reader
                diff.append("the training data's content (other records than the run was started with)")
            else:
                diff.append(f"{name} {old_extra[name]!r} → {new_extra[name]!r}")
    return diff


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, checked: ``None``, the newest complete one for ``"latest"``, or the given one.

    With ``"latest"`` a corrupt newest checkpoint (cut-off weights or optimizer state) is named in a warning and the
    newest complete one before it is used. The checkpoint's recorded configuration must match ``cfg`` in every
    setting that changes the result.

    Raises:
        ConfigError: The given checkpoint is corrupt, or the configuration differs (the message lists the diff).
    """
    if cfg.resume is None:
        return None
    output_dir = Path(cfg.output_dir)
    if cfg.resume == "latest":
        newest: list[str] = []

        def skipped(folder: Path, reason: str) -> None:
            newest.append(reason)
            logger.warning("skipping incomplete checkpoint %s (%s); falling back to an older one", folder, reason)
            print(f"warning: skipping incomplete checkpoint {folder.name}: {reason}", file=sys.stderr)

        checkpoint = find_resumable_checkpoint(output_dir, cfg.max_steps, on_skip=skipped)
        if checkpoint is None and newest:
            raise ConfigError(
                f"--resume: every checkpoint in {output_dir} is incomplete or inconsistent "
                f"(newest: {newest[0]}); start again with --overwrite_output_dir"
            )
        if checkpoint is None:
            return None
    else:
        checkpoint = Path(cfg.resume)
        reason = checkpoint_problem(checkpoint, cfg.max_steps)
        if reason is not None:
            raise ConfigError(
                f"--resume {checkpoint}: corrupt checkpoint ({reason}); resume from an older checkpoint-N or drop "
                "--resume to start again"
            )
    recorded = _recorded_config(checkpoint, output_dir)
    if recorded is not None:
        diff = config_diff(cfg, recorded)
        if diff:
            raise ConfigError(
                f"--resume {checkpoint}: the run was started with different settings ({'; '.join(diff)}); resume "
                "with the original values, or start a new run (--overwrite_output_dir or another --output_dir)"
            )
    return checkpoint


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _checkpoint_step(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _single_process_rendezvous() -> None:
    """Give DeepSpeed a one-process group when no launcher set one up (it would otherwise try MPI discovery).

    Sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` for this process, as the HF guide
    does for DeepSpeed in a notebook; they stay set, like the process group DeepSpeed creates.
    """
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_distributed(cuda: bool, timeout_s: int) -> bool:
    """Create the process group of a torchrun job now (e.g. to evaluate before training), with the run's timeout.

    The Trainer reuses a group that already exists, so the timeout given here is the one every collective of the run
    gets. Without it NCCL's own default (10 minutes) would silently replace ``TrainConfig.ddp_timeout``.

    Args:
        cuda: Use NCCL on this process's ``LOCAL_RANK`` GPU (gloo on CPU).
        timeout_s: Seconds before a collective times out (``TrainConfig.ddp_timeout``).

    Returns:
        Whether this call created the group (``False`` for one process or an existing group).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    if cuda:
        torch.cuda.set_device(local_device(cuda=True))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented, strict JSON atomically (never half-written); other objects become strings."""
    atomic_write_json(path, payload, default=str)


class _RecordConfig(TrainerCallback):
    """Copy the run's ``train_config.json`` into every checkpoint (what a resume is compared with)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / "train_config.json", self.config)


def _non_finite_parameter(model: nn.Module) -> str | None:
    """The first trainable parameter holding NaN/inf (``None`` when all are finite)."""
    for name, param in model.named_parameters():
        if param.requires_grad and param.numel() and not bool(torch.isfinite(param.detach()).all()):
            return name
    return None


@contextlib.contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """Turn full-disk / file-size-limit / read-only errors while writing under ``path`` into one line naming it."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless it is a storage failure
        message = describe_storage_error(exc, path)
        if message is None:
            raise
        raise StorageError(f"saving under {message}") from exc


def _save_final(trainer: Phi3VTrainer, output_dir: Path, processor: Any | None) -> Path:
    """Save model/adapter (and processor) into ``output_dir``: a staging folder, then journaled moves into place.

    Refuses to save weights holding NaN/inf (a diverged run is never saved as the final model).
    """
    bad = _non_finite_parameter(trainer.model)
    if bad is not None:
        raise TrainingDivergedError(
            f"parameter {bad} is not finite after step {trainer.state.global_step}; the final model was not saved: "
            "lower the learning rate or use bf16 instead of fp16"
        )
    staging = output_dir / ".final-staging"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # a save cut off before its moves began: start it again
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank calls it (DeepSpeed gathers); only the main process writes
    if trainer.args.should_save:
        if processor is not None:
            processor.save_pretrained(staging)
        modes_from_umask(staging)  # safetensors writes 0600; the user's umask decides
        move_into(staging, output_dir, "phi3v-finetune final save")  # journaled: a kill is finished by the next run
    trainer.accelerator.wait_for_everyone()
    return output_dir


def _train_or_finish(trainer: Phi3VTrainer, cfg: TrainConfig, resume_from: Path | None) -> tuple[Any, float]:
    """Run the Trainer (resuming from ``resume_from``); return its output (``None`` if no step ran) and mean loss."""
    if resume_from is not None and cfg.max_steps > 0 and _checkpoint_step(resume_from) >= cfg.max_steps:
        # Stopped after its last step (e.g. killed during the final save): finish without another step.
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return None, float(sum(logged) / len(logged)) if logged else float("nan")
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return output, float(output.training_loss)


def _step_timer(callbacks: Sequence[TrainerCallback]) -> tuple[StepTimer, list[StepTimer]]:
    """The run's StepTimer and the one train() adds itself (none when the caller passes one).

    One StepTimer per Trainer: the caller's (the benchmark's window) when it passes one, else ours. Two would each
    synchronise and record every step, and transformers warns "there is already one" for the second.
    """
    timer = next((c for c in callbacks if isinstance(c, StepTimer)), None)
    return (timer, []) if timer is not None else ((own := StepTimer()), [own])


def train(
    cfg: TrainConfig,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    processor: Any | None = None,
    env: Machine | None = None,
) -> TrainResult:
    """Fine-tune Phi-3(.5)-vision with one of the four methods.

    Args:
        cfg: The run configuration; validated first (every problem reported at once).
        train_dataset: Map-style dataset of encoded examples (``Phi3VProcessor.encode_conversation`` outputs).
        eval_dataset: Optional dataset evaluated once after training (``eval_loss``).
        callbacks: Extra ``TrainerCallback`` objects, e.g. a :class:`StepTimer` for the benchmark.
        processor: If given, saved next to the final model (like the recipe).
        env: The machine (detected when omitted; tests pass a fake one to exercise validation).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: Invalid configuration for this machine (before anything is loaded or written).
        TrainingDivergedError: The loss became NaN/inf (or is 0 on the first step).
    """
    env = env or Machine.detect()
    non_finite = [f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg) if _is_non_finite(getattr(cfg, f.name))]
    if non_finite:
        raise ConfigError(f"settings must be finite numbers: {', '.join(non_finite)}; pass finite values")
    cfg.validate(env)
    output_dir = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg)

    model, report = prepare_model(cfg, env)
    if cfg.uses_deepspeed(env.world_size):
        _single_process_rendezvous()
    args = build_training_arguments(cfg, env)
    timer, own_timer = _step_timer(callbacks)
    collator = training_collator(cfg.packing, cfg.pack_tokens, cfg.attn, cfg.supervised_logits_only)
    trainer = Phi3VTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[LossGuard(), *own_timer, _RecordConfig(cfg.to_dict()), CheckpointManifest(), *callbacks],
        **trainer_levers(cfg),
    )
    with _storage_errors(output_dir):
        if args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(output_dir / "train_config.json", cfg.to_dict())
        output, train_loss = _train_or_finish(trainer, cfg, resume_from)
        eval_metrics = trainer.evaluate() if eval_dataset is not None else None
        saved_to = _save_final(trainer, output_dir, processor) if cfg.save_final else None
        if args.should_save:
            trainer.save_state()  # trainer_state.json with the full per-step log
            if cfg.save_final:
                write_json_atomic(
                    output_dir / COMPLETE_MARKER,
                    {"global_step": trainer.state.global_step, "max_steps": cfg.max_steps, "finished": time.time()},
                )

    losses = {int(entry["step"]): float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry}
    return TrainResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        losses=losses,
        train_loss=train_loss,
        steps=timer.records,
        report=report,
        metrics=dict(output.metrics) if output is not None else {},
        eval_metrics=eval_metrics,
        resumed_from=resume_from,
        saved_to=saved_to,
        world_size=env.world_size,
        zero_stage=trainer.deepspeed.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
        model=trainer.model,
    )
