"""The model a run trains: the base model built from a config, then changed by the fine-tuning method.

Its own module so that evaluation (which rebuilds the base model for a baseline) and training both use it without
importing each other.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import set_seed

from phi3v_core.config import MODEL_PRESETS, get_config
from phi3v_core.device import default_dtype, local_device
from phi3v_core.kernels import apply_kernels
from phi3v_core.methods import MethodReport, build_quantized_model, get_method
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.training.config import DTYPES, TrainConfig
from phi3v_core.training.machine import Machine

__all__ = ["build_model", "prepare_model"]


def build_model(cfg: TrainConfig, env: Machine | None = None) -> Phi3VForCausalLM:
    """The base model of a run, before the method changes it.

    Presets are initialised randomly from ``cfg.seed`` (so the same config rebuilds the same base, e.g. to reload a
    LoRA adapter), directly on the training device; QLoRA presets are built there already in nf4, one layer at a time
    (:func:`~phi3v_core.methods.build_quantized_model`). Folders load with ``from_pretrained`` into CPU memory (QLoRA
    then moves them to the device one quantized layer at a time). Weights are fp32 for
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
        if get_method(cfg.method).quantized:  # layer by layer into nf4: the 16-bit model never sits on the device
            model, _ = build_quantized_model(lambda: Phi3VForCausalLM(config), dtype, dtype, local_device(env.cuda))
        else:
            with default_dtype(dtype), torch.device(local_device(env.cuda)):
                model = Phi3VForCausalLM(config)
    else:
        model = Phi3VForCausalLM.from_pretrained(cfg.model, attn_implementation=cfg.attn, dtype=dtype)
    model.config.use_cache = False  # no KV cache while training (and required with gradient checkpointing)
    return model


def prepare_model(cfg: TrainConfig, env: Machine | None = None) -> tuple[nn.Module, MethodReport]:
    """:func:`build_model`, the ``kernels`` patch, then the method's ``prepare`` (seeded: LoRA init is reproducible)."""
    env = env or Machine.detect()
    model = build_model(cfg, env)
    kernels = apply_kernels(model, cfg.kernels)  # before the method: LoRA then wraps the patched modules' Linears
    set_seed(cfg.seed)
    model, report = get_method(cfg.method).prepare(model, cfg.method_options(local_device(env.cuda)))
    if cfg.kernels != "none":
        report.notes.append(kernels.summary())
    return model, report
