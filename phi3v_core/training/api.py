"""``train()``: the Python entry point the benchmark, the finetune CLI and the launcher call.

Order of work: validate everything (before touching a GPU or writing a file) → build the model → apply the method
→ HF Trainer with our collator → optional resume → final save (atomic per file) → :class:`TrainResult`.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainerCallback, set_seed

from phi3v_core.config import MODEL_PRESETS, get_config
from phi3v_core.device import default_dtype, local_device
from phi3v_core.io import atomic_write_json
from phi3v_core.methods import MethodReport, get_method
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.processing import PAD_TOKEN_ID, Phi3VDataCollator
from phi3v_core.training.callbacks import LossGuard, StepRecord, StepTimer
from phi3v_core.training.collate import SupervisedLogitsCollator
from phi3v_core.training.config import DTYPES, Machine, TrainConfig, find_resumable_checkpoint
from phi3v_core.training.trainer import Phi3VTrainer, build_training_arguments

__all__ = ["TrainResult", "build_model", "prepare_model", "resolve_resume", "train", "write_json_atomic"]


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


def build_model(cfg: TrainConfig, env: Machine | None = None) -> Phi3VForCausalLM:
    """The base model of a run, before the method changes it.

    Presets are initialised randomly from ``cfg.seed`` (so the same config rebuilds the same base, e.g. to reload a
    LoRA adapter), directly on the training device. Folders load with ``from_pretrained``. Weights are fp32 for
    full/frozen_vision (AMP master weights) and the compute dtype for lora/qlora (frozen base).

    Args:
        cfg: The run configuration (``model``, ``attn``, ``method``, ``precision``, ``seed``).
        env: The machine (detected when omitted).
    """
    env = env or Machine.detect()
    dtype = DTYPES[cfg.precision] if get_method(cfg.method).uses_lora else torch.float32
    set_seed(cfg.seed)
    if cfg.model in MODEL_PRESETS:
        config = get_config(cfg.model, attn_implementation=cfg.attn)
        with default_dtype(dtype), torch.device(local_device(env.cuda)):
            model = Phi3VForCausalLM(config)
    else:
        model = Phi3VForCausalLM.from_pretrained(cfg.model, attn_implementation=cfg.attn, dtype=dtype)
    model.config.use_cache = False  # no KV cache while training (and required with gradient checkpointing)
    return model


def prepare_model(cfg: TrainConfig, env: Machine | None = None) -> tuple[nn.Module, MethodReport]:
    """:func:`build_model` followed by the method's ``prepare`` (seeded, so LoRA init is reproducible)."""
    env = env or Machine.detect()
    model = build_model(cfg, env)
    set_seed(cfg.seed)
    return get_method(cfg.method).prepare(model, cfg.method_options(local_device(env.cuda)))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: ``None``, the newest complete one for ``"latest"``, or the given folder."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        return find_resumable_checkpoint(cfg.output_dir)
    return Path(cfg.resume)


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


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented, strict JSON atomically (never half-written); other objects become strings."""
    atomic_write_json(path, payload, default=str)


def _save_final(trainer: Phi3VTrainer, output_dir: Path, processor: Any | None) -> Path:
    """Save model/adapter (and processor) into ``output_dir``, each file via a staging folder + ``os.replace``."""
    staging = output_dir / ".final-staging"
    trainer.save_model(str(staging))  # every rank calls it (DeepSpeed gathers); only the main process writes
    if trainer.args.should_save:
        if processor is not None:
            processor.save_pretrained(staging)
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return output_dir


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
    cfg.validate(env)
    output_dir = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg)

    model, report = prepare_model(cfg, env)
    if cfg.uses_deepspeed(env.world_size):
        _single_process_rendezvous()
    args = build_training_arguments(cfg, env)
    timer = StepTimer()
    collator: Any = Phi3VDataCollator(pad_token_id=PAD_TOKEN_ID, padding_side="right")
    if cfg.supervised_logits_only:
        collator = SupervisedLogitsCollator(collator)
    trainer = Phi3VTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[LossGuard(), timer, *callbacks],
    )
    if args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "train_config.json", cfg.to_dict())

    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    eval_metrics = trainer.evaluate() if eval_dataset is not None else None
    saved_to = _save_final(trainer, output_dir, processor) if cfg.save_final else None
    if args.should_save:
        trainer.save_state()  # trainer_state.json with the full per-step log

    losses = {int(entry["step"]): float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry}
    return TrainResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        losses=losses,
        train_loss=float(output.training_loss),
        steps=timer.records,
        report=report,
        metrics=dict(output.metrics),
        eval_metrics=eval_metrics,
        resumed_from=resume_from,
        saved_to=saved_to,
        world_size=env.world_size,
        zero_stage=trainer.deepspeed.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
        model=trainer.model,
    )
