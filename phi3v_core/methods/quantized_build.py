"""Build a QLoRA base directly in nf4, so that the 16-bit model never exists whole on the device.

The model is first built on the ``meta`` device (shapes only, no memory). Then it is materialised in pieces: first
everything outside the decoder and CLIP encoder layers (embeddings, norms, ``lm_head``, the CLIP patch embedding, the
projector), then one layer at a time (the model's ``_no_split_modules``: ``Phi3DecoderLayer``, ``CLIPEncoderLayer``).
Each piece is allocated on the device in the 16-bit dtype, initialised by transformers' own ``initialize_weights``
(the same per-module rules as a normal build, so CLIP keeps its own init scales), and its ``nn.Linear`` layers are
replaced by nf4 ``Linear4bit`` at once (:func:`~phi3v_core.methods.lora.replace_with_linear4bit`), which frees their
16-bit weights before the next piece is allocated.

Build-time peak: at each piece, the pieces built so far + that piece's 16-bit linear weights + bitsandbytes'
quantization temporaries; the pieces come in module order (the decoder layers before the CLIP layers), and
``planner.loading.build_peak_bytes`` predicts the largest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from phi3v_core.device import default_dtype
from phi3v_core.methods.lora import QLORA_SKIP, replace_with_linear4bit

__all__ = ["build_quantized_model", "layer_units"]


def layer_units(model: PreTrainedModel) -> list[str]:
    """Names of the modules built one at a time: every instance of a class in ``model._no_split_modules``."""
    classes = set(model._no_split_modules or ())
    return [name for name, module in model.named_modules() if type(module).__name__ in classes]


def _materialise(modules: list[nn.Module], device: torch.device) -> None:
    """Allocate (uninitialised) storage on ``device`` for the direct parameters and buffers of ``modules``."""
    for module in modules:
        module.to_empty(device=device, recurse=False)
        module._is_hf_initialized = False  # let initialize_weights run on it


def _flag_pieces(model: nn.Module, unit_of: dict[str, str]) -> None:
    """Flag the modules of the layer units as initialised, so that they wait for their turn."""
    for name, module in model.named_modules():
        module._is_hf_initialized = name in unit_of


def _quantize_linears(model: nn.Module, names: list[str], compute_dtype: torch.dtype, device: torch.device) -> None:
    for name in names:
        replace_with_linear4bit(model, name, compute_dtype, device)
        model.get_submodule(name)._is_hf_initialized = True  # later initialize_weights calls must not touch nf4 data


def build_quantized_model(
    build: Callable[[], PreTrainedModel],
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: str | torch.device,
    skip: tuple[str, ...] = QLORA_SKIP,
) -> tuple[PreTrainedModel, list[str]]:
    """Build a randomly initialised model with every ``nn.Linear`` (except ``skip``) in nf4, piece by piece.

    The result has the same modules as building the model and then calling
    :func:`~phi3v_core.methods.lora.quantize_linear_layers` on it: the same layers are ``Linear4bit``, the same stay
    16-bit. Seeded runs rebuild identical weights (the pieces are initialised in a fixed order).

    Args:
        build: Builds the model (e.g. ``lambda: Phi3VForCausalLM(config)``); it runs on the ``meta`` device.
        dtype: dtype of everything that is not quantized (and of the weights before quantization).
        compute_dtype: dtype of the 4-bit layers' dequantized matmuls.
        device: Where the model is materialised.
        skip: Linear layers that stay 16-bit.

    Returns:
        The model (flagged ``is_loaded_in_4bit``, as PEFT expects) and the names of the quantized modules.
    """
    device = torch.device(device)
    # Imported before anything is allocated: bitsandbytes may log a warning carrying an exception on import (0.50's CPU
    # backend does when its optional kernel does not load), and a handler that keeps log records (pytest's capture)
    # keeps that traceback's frames, and with them whatever piece of the model the importing frames held, alive.
    import bitsandbytes  # noqa: F401

    with torch.device("meta"), default_dtype(dtype):
        model = build()
    units = layer_units(model)
    unit_of: dict[str, str] = {}
    for unit in units:
        for name, _ in model.get_submodule(unit).named_modules(prefix=unit):
            unit_of[name] = unit
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear and name not in skip]
    _flag_pieces(model, unit_of)
    # Each sub-model initialises its own modules, innermost first, as their post_init calls do in a normal build (a
    # sub-model's rules, e.g. CLIP's init scales, apply only when it, not the outer model, runs initialize_weights).
    owners = [name for name, module in model.named_modules() if isinstance(module, PreTrainedModel)][::-1]
    # No list of modules outlives this call: it would keep the replaced 16-bit linears (the projector's) alive.
    _materialise([module for name, module in model.named_modules() if name not in unit_of], device)
    for owner in owners:
        model.get_submodule(owner).initialize_weights()
    _quantize_linears(model, [name for name in linears if name not in unit_of], compute_dtype, device)
    for unit in units:
        _materialise(list(model.get_submodule(unit).modules()), device)
        owner = next(name for name in owners if unit.startswith(f"{name}.") or not name)
        model.get_submodule(owner).initialize_weights()  # only this unit is un-flagged
        _quantize_linears(model, [name for name in linears if unit_of.get(name) == unit], compute_dtype, device)
    model.is_loaded_in_4bit = True  # PEFT picks its bitsandbytes LoRA layer for models flagged like this
    return model, linears
