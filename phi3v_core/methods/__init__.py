"""The fine-tuning methods and their registry (torch-free: the implementations load on first use).

>>> from phi3v_core.methods import get_method, MethodOptions
>>> model, report = get_method("lora").prepare(model, MethodOptions(lora_rank=8))  # doctest: +SKIP
>>> report.summary()  # doctest: +SKIP

A method is one :class:`~phi3v_core.methods.spec.Method` entry below plus the module that implements its
``prepare``; the planner, the bench, selfcheck and the CLIs read everything else from the entry (see
:mod:`phi3v_core.methods.spec`). Importing this package is light; the torch-heavy names (``MethodOptions``,
``build_quantized_model``, ...) are imported from their modules when first asked for.
"""

from __future__ import annotations

from typing import Any

from phi3v_core.errors import ConfigError
from phi3v_core.methods.dora import DORA
from phi3v_core.methods.spec import LORA, NOT_IN_RECIPE, Adapter, Method

__all__ = [
    "LORA",
    "METHODS",
    "METHOD_NAMES",
    "NOT_IN_RECIPE",
    "QLORA_KEEP_16BIT",
    "QLORA_SKIP",
    "VISION_PREFIX",
    "Adapter",
    "LoraTarget",
    "Method",
    "MethodOptions",
    "MethodReport",
    "build_quantized_model",
    "freeze_dead_weights",
    "get_method",
    "layer_units",
    "lora_targets",
    "quantize_linear_layers",
    "quantized_module_names",
    "replace_with_linear4bit",
]

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "full",
            "train all weights (DeepSpeed ZeRO-2 when distributed)",
            "phi3v_core.methods.freeze:prepare_full",
            trains_base=True,
            trains_vision=True,
            adapter=None,
            quantized=False,
            supports_deepspeed=True,
            recipe_name="full fine-tuning",
            letter="F",
        ),
        Method(
            "frozen_vision",
            "freeze CLIP, projector and separators; train the language model incl. embeddings",
            "phi3v_core.methods.freeze:prepare_frozen_vision",
            trains_base=True,
            trains_vision=False,
            adapter=None,
            quantized=False,
            supports_deepspeed=True,
            recipe_name="frozen image model",
            letter="Z",
        ),
        Method(
            "lora",
            "LoRA adapters on the LM (and CLIP + projector unless freeze_vision); base frozen in 16-bit",
            "phi3v_core.methods.lora:prepare_lora",
            trains_base=False,
            trains_vision=False,
            adapter=LORA,
            quantized=False,
            supports_deepspeed=False,
            recipe_name="LoRA",
            letter="L",
        ),
        Method(
            "qlora",
            "LoRA over an nf4 4-bit base (bitsandbytes Linear4bit)",
            "phi3v_core.methods.lora:prepare_qlora",
            trains_base=False,
            trains_vision=False,
            adapter=LORA,
            quantized=True,
            supports_deepspeed=False,
            recipe_name="QLoRA",
            letter="Q",
            traced_as="lora",  # nf4 layers quantize on .to(): a meta-device build prepares the same shapes as LoRA
        ),
        Method(
            "dora",
            "DoRA (peft use_dora): LoRA plus a trained magnitude per output row; base frozen in 16-bit",
            "phi3v_core.methods.dora:prepare_dora",
            trains_base=False,
            trains_vision=False,
            adapter=DORA,
            quantized=False,
            supports_deepspeed=False,
            recipe_name=None,
            letter="D",
            hyperparameters_from="lora",
        ),
    )
}

#: The registered method names, in registry order (CLI choices, sweeps, selfcheck).
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

#: Torch-heavy names this package re-exports, imported on first access (PEP 562).
_LAZY = {
    "VISION_PREFIX": "phi3v_core.methods.base",
    "MethodOptions": "phi3v_core.methods.base",
    "MethodReport": "phi3v_core.methods.base",
    "freeze_dead_weights": "phi3v_core.methods.base",
    "QLORA_KEEP_16BIT": "phi3v_core.methods.lora",
    "QLORA_SKIP": "phi3v_core.methods.lora",
    "LoraTarget": "phi3v_core.methods.lora",
    "lora_targets": "phi3v_core.methods.lora",
    "quantize_linear_layers": "phi3v_core.methods.lora",
    "quantized_module_names": "phi3v_core.methods.lora",
    "replace_with_linear4bit": "phi3v_core.methods.lora",
    "build_quantized_model": "phi3v_core.methods.quantized_build",
    "layer_units": "phi3v_core.methods.quantized_build",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def get_method(name: str) -> Method:
    """Return the registry entry for ``name``.

    Raises:
        ConfigError: Unknown method name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
