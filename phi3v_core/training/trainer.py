"""The single training path: a thin ``transformers.Trainer`` subclass and the ``TrainingArguments`` we derive.

All four methods share it. The subclass only meters the micro-batches for :class:`StepTimer`; loss scaling over
gradient accumulation and processes is the Trainer's own (the model accepts ``num_items_in_batch`` through
``**kwargs`` and returns the token sum divided by it, so a global batch gives the same gradient however it is split
into devices × accumulation × micro-batches).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from phi3v_core.model.checkpointing import checkpointing_arguments
from phi3v_core.training.callbacks import StepMeter, StepTimer
from phi3v_core.training.config import TrainConfig
from phi3v_core.training.deepspeed_config import deepspeed_config
from phi3v_core.training.levers import TowerCheckpointing, tower_param_groups
from phi3v_core.training.machine import Machine

__all__ = ["Phi3VTrainer", "build_training_arguments"]


class Phi3VTrainer(Trainer):
    """``Trainer`` that counts samples, tokens and images per optimizer step for :class:`StepTimer` callbacks."""

    def __init__(
        self, *args: Any, tower_rates: dict[str, float] | None = None, checkpoint_towers: str = "both", **kwargs: Any
    ) -> None:
        """Args as ``Trainer``'s, plus the per-tower levers (:mod:`phi3v_core.training.levers`).

        Args:
            tower_rates: Learning rate per tower (one optimizer group each); None: one rate for all.
            checkpoint_towers: ``both``, ``llm`` or ``vision``: where gradient checkpointing stays on.
        """
        self.step_meter = StepMeter()  # before super().__init__, which already calls add_callback
        self.tower_rates = tower_rates
        super().__init__(*args, **kwargs)
        self._connect_timers()
        if checkpoint_towers != "both":
            self.add_callback(TowerCheckpointing(checkpoint_towers))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, regrouped into one parameter group per tower when per-tower rates are set.

        The Trainer builds it first (so its own rules still apply: the optimizer class and arguments, bitsandbytes'
        32-bit override for embeddings); before any step the groups hold no state, so they are replaced by the tower
        groups, which take the optimizer's defaults for every key they do not set.
        """
        if self.tower_rates is None or self.optimizer is not None:
            return super().create_optimizer(*([model] if model is not None else []))
        optimizer = super().create_optimizer(*([model] if model is not None else []))
        opt_model = model if model is not None else self.model
        groups = tower_param_groups(
            opt_model, self.tower_rates, self.args.weight_decay, self.get_decay_parameter_names(opt_model)
        )
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def add_callback(self, callback: Any) -> None:
        """Add a callback; a :class:`StepTimer` gets this trainer's meter."""
        super().add_callback(callback)
        self._connect_timers()

    def _connect_timers(self) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StepTimer):
                callback.meter = self.step_meter

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save like the Trainer, but write LoRA adapters without copies of the frozen base ``lm_head``.

        PEFT treats an adapted ``lm_head`` as an "embedding layer" and by default stores the whole base matrix next to
        the adapter (98.5M parameters on the real model) although it never changes; the base model has it.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, save_embedding_layers=False)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The Trainer's prefetch of one optimizer step's micro-batches, timed: the data-loader wait of the step."""
        began = time.perf_counter()
        batches = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.step_meter.data_wait_s = time.perf_counter() - began
        return batches

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        self.step_meter.add(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


def build_training_arguments(cfg: TrainConfig, env: Machine) -> TrainingArguments:
    """Map a validated :class:`TrainConfig` onto ``TrainingArguments`` (recipe values where it fixes them).

    Args:
        cfg: The run configuration.
        env: The machine (CPU runs use gloo for multi-process and ``use_cpu``).
    """
    workers = cfg.dataloader_num_workers
    if not cfg.uses_deepspeed(env.world_size):
        # TrainingArguments with a DeepSpeed config sets this process-wide and nothing unsets it: an earlier DeepSpeed
        # run in this process would turn this run into a DeepSpeed run too.
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    if not env.cuda:
        # DeepSpeed (imported by accelerate even for runs that do not use it) picks its accelerator on first use and
        # warns "Setting accelerator to CPU ... unable to detect it" when it finds no GPU. No GPU is what this machine
        # has (or what CUDA_VISIBLE_DEVICES= asked for): say so up front, which is the same choice without the warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return TrainingArguments(
        output_dir=str(cfg.output_dir),
        per_device_train_batch_size=cfg.micro_batch,
        per_device_eval_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps(env.world_size),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.hf_optim,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        **checkpointing_arguments(cfg.gradient_checkpointing),  # transformers 5.25's names where it has them
        torch_compile=cfg.compile,
        logging_steps=cfg.logging_steps,
        # Keep NaN/inf in the log so LossGuard sees them (the default silently replaces them by the running mean).
        logging_nan_inf_filter=False,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        full_determinism=cfg.deterministic,
        remove_unused_columns=False,  # the collator's keys are exactly the model's inputs
        label_names=["labels"],  # PEFT wrappers hide forward()'s signature, so say it explicitly
        report_to=cfg.report_to,
        deepspeed=(cfg.deepspeed_config_file or deepspeed_config(cfg)) if cfg.uses_deepspeed(env.world_size) else None,
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=2 if workers else None,
        dataloader_persistent_workers=False,
        ddp_find_unused_parameters=cfg.ddp_find_unused_parameters,
        ddp_backend="gloo" if env.world_size > 1 and not env.cuda else None,
        ddp_timeout=cfg.ddp_timeout,
        use_cpu=not env.cuda,
        disable_tqdm=cfg.disable_tqdm,
        eval_strategy="no",
    )
