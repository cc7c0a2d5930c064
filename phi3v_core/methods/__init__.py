"""The four fine-tuning methods and their registry.

>>> from phi3v_core.methods import get_method, MethodOptions
>>> model, report = get_method("lora").prepare(model, MethodOptions(lora_rank=8))  # doctest: +SKIP
>>> report.summary()  # doctest: +SKIP
"""

from __future__ import annotations

from phi3v_core.constants import METHOD_NAMES
from phi3v_core.errors import ConfigError
from phi3v_core.methods.base import VISION_PREFIX, Method, MethodOptions, MethodReport, freeze_dead_weights
from phi3v_core.methods.freeze import prepare_frozen_vision, prepare_full
from phi3v_core.methods.lora import (
    QLORA_KEEP_16BIT,
    QLORA_SKIP,
    LoraTarget,
    lora_targets,
    prepare_lora,
    prepare_qlora,
    quantize_linear_layers,
    quantized_module_names,
    replace_with_linear4bit,
)
from phi3v_core.methods.quantized_build import build_quantized_model, layer_units

__all__ = [
    "METHODS",
    "QLORA_KEEP_16BIT",
    "QLORA_SKIP",
    "VISION_PREFIX",
    "build_quantized_model",
    "layer_units",
    "LoraTarget",
    "Method",
    "MethodOptions",
    "MethodReport",
    "freeze_dead_weights",
    "get_method",
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
            prepare_full,
            uses_lora=False,
            quantized=False,
            supports_deepspeed=True,
        ),
        Method(
            "frozen_vision",
            "freeze CLIP, projector and separators; train the language model incl. embeddings",
            prepare_frozen_vision,
            uses_lora=False,
            quantized=False,
            supports_deepspeed=True,
        ),
        Method(
            "lora",
            "LoRA adapters on the LM (and CLIP + projector unless freeze_vision); base frozen in 16-bit",
            prepare_lora,
            uses_lora=True,
            quantized=False,
            supports_deepspeed=False,
        ),
        Method(
            "qlora",
            "LoRA over an nf4 4-bit base (bitsandbytes Linear4bit)",
            prepare_qlora,
            uses_lora=True,
            quantized=True,
            supports_deepspeed=False,
        ),
    )
}


if tuple(METHODS) != METHOD_NAMES:  # the light modules read the names from constants; both must list the same four
    raise RuntimeError(f"phi3v_core.methods registers {tuple(METHODS)}, constants.METHOD_NAMES is {METHOD_NAMES}")


def get_method(name: str) -> Method:
    """Return the registry entry for ``name``.

    Raises:
        ConfigError: Unknown method name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
