"""LoRA and QLoRA: PEFT adapters on explicit module-name patterns, optionally over an nf4 4-bit base.

Targets (the recipe's list, written as full-name regexes so that nothing collides or silently misses):

* language model: ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` of every decoder layer;
* ``lm_head`` when ``lora_lm_head`` (the recipe always adapts it);
* unless ``freeze_vision``: CLIP ``q/k/v/out_proj``, ``fc1``, ``fc2`` of the *live* encoder layers (the dead last
  layer gets no adapter: it would receive no gradient) and the projector ``img_projection.0`` / ``.2``.

Every pattern must match at least one ``nn.Linear``; otherwise :class:`~phi3v_core.errors.ConfigError` says which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from phi3v_core.errors import ConfigError
from phi3v_core.methods.base import MethodOptions, MethodReport, make_report
from phi3v_core.model import dead_parameter_names

__all__ = [
    "LoraTarget",
    "attach_lora",
    "QLORA_KEEP_16BIT",
    "QLORA_SKIP",
    "lora_targets",
    "prepare_lora",
    "prepare_qlora",
    "quantize_linear_layers",
    "quantized_module_names",
    "replace_with_linear4bit",
]

_CLIP_LAYERS = r"model\.vision_embed_tokens\.img_processor\.vision_model\.encoder\.layers"

#: Linear layers QLoRA leaves un-quantized. ``lm_head``: transformers' bitsandbytes integration skips the output head
#: too (the recipe relies on that default). Every other Linear, the projector included, is nf4.
QLORA_SKIP = ("lm_head",)

#: What QLoRA leaves un-quantized (stored in the compute dtype): everything that is not an ``nn.Linear``, plus
#: :data:`QLORA_SKIP`.
QLORA_KEEP_16BIT = (
    *QLORA_SKIP,
    "model.embed_tokens",
    "RMS/Layer norms",
    "CLIP patch conv and position embedding",
    "glb_GN/sub_GN separators",
)


@dataclass(frozen=True)
class LoraTarget:
    """One named group of LoRA targets.

    Attributes:
        label: What the group is, for error messages (e.g. ``"LM qkv_proj"``).
        pattern: A regex that must *fully* match module names (PEFT uses ``re.fullmatch`` for string targets).
    """

    label: str
    pattern: str


def lora_targets(model: nn.Module, options: MethodOptions) -> list[LoraTarget]:
    """The LoRA target groups for this model and options (dead CLIP layers excluded).

    Args:
        model: The unwrapped ``Phi3VForCausalLM``.
        options: Method options (``lora_lm_head``, ``freeze_vision``).
    """
    groups = [
        LoraTarget(f"LM {proj}", rf"model\.layers\.\d+\.{block}\.{proj}")
        for block, proj in (
            ("self_attn", "qkv_proj"),
            ("self_attn", "o_proj"),
            ("mlp", "gate_up_proj"),
            ("mlp", "down_proj"),
        )
    ]
    if options.lora_lm_head:
        groups.append(LoraTarget("lm_head", r"lm_head"))
    if not options.freeze_vision:
        live = "|".join(str(i) for i in _live_clip_layers(model))
        groups += [
            LoraTarget(f"CLIP {proj}", rf"{_CLIP_LAYERS}\.(?:{live})\.{block}\.{proj}")
            for block, proj in (
                ("self_attn", "q_proj"),
                ("self_attn", "k_proj"),
                ("self_attn", "v_proj"),
                ("self_attn", "out_proj"),
                ("mlp", "fc1"),
                ("mlp", "fc2"),
            )
        ]
        groups += [
            LoraTarget(f"projector img_projection.{i}", rf"model\.vision_embed_tokens\.img_projection\.{i}")
            for i in (0, 2)
        ]
    return groups


def _live_clip_layers(model: nn.Module) -> list[int]:
    """Indices of CLIP encoder layers that feed the image features (those without dead parameters)."""
    layer_of = re.compile(rf"{_CLIP_LAYERS}\.(\d+)\.")
    all_layers = {int(m.group(1)) for name, _ in model.named_parameters() if (m := layer_of.match(name))}
    dead_layers = {int(m.group(1)) for name in dead_parameter_names(model) if (m := layer_of.match(name))}
    return sorted(all_layers - dead_layers)


def _check_targets(model: nn.Module, targets: list[LoraTarget]) -> None:
    """Fail with every target group that matches no linear layer (a typo or a changed model must not pass silently)."""
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [t for t in targets if not any(re.fullmatch(t.pattern, name) for name in linear_names)]
    if missing:
        raise ConfigError(
            "LoRA targets match no linear layer: "
            + ", ".join(f"{t.label} ({t.pattern})" for t in missing)
            + "; the model's module names differ from the Phi-3.5-vision checkpoint names"
        )


def attach_lora(
    model: nn.Module, options: MethodOptions, method: str, **variant: Any
) -> tuple[nn.Module, MethodReport]:
    """Attach PEFT LoRA adapters on :func:`lora_targets` and report them under ``method``.

    Args:
        model: The (possibly quantized) base model.
        options: Rank, alpha, dropout and targets.
        method: Registry name for the report.
        variant: Further ``peft.LoraConfig`` fields of a LoRA variant (e.g. ``use_dora=True``).
    """
    targets = lora_targets(model, options)
    _check_targets(model, targets)
    config = LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        init_lora_weights="gaussian",
        target_modules="|".join(f"(?:{t.pattern})" for t in targets),
        bias="none",
        task_type="CAUSAL_LM",
        **variant,
    )
    # autocast_adapter_dtype (the default) keeps adapter weights in fp32 over a 16-bit base: they are the only
    # trained weights, so they are the master weights that AMP updates.
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    report = make_report(peft_model, method, lora_targets=sorted(peft_model.targeted_module_names))
    return peft_model, report


def prepare_lora(model: nn.Module, options: MethodOptions) -> tuple[nn.Module, MethodReport]:
    """Cast the frozen base to ``options.base_dtype`` and attach LoRA adapters (the returned model is a PeftModel)."""
    if options.base_dtype is not None:
        model.to(options.base_dtype)
    return attach_lora(model, options, "lora")


def quantize_linear_layers(
    model: nn.Module,
    compute_dtype: torch.dtype,
    device: str | torch.device,
    skip: tuple[str, ...] = QLORA_SKIP,
) -> list[str]:
    """Replace every ``nn.Linear`` (except ``skip``) by a ``bitsandbytes.nn.Linear4bit`` holding nf4 weights.

    Same choices as the recipe's ``BitsAndBytesConfig``: nf4, no double quantization, uint8 storage; the output head
    stays 16-bit (see :data:`QLORA_SKIP`). Each layer is quantized when its weight moves to ``device`` (bitsandbytes quantizes on ``.to``),
    so on a GPU the full-precision copy of one layer at a time is all that is added to the 4-bit model.

    Args:
        model: The model to change in place.
        compute_dtype: dtype of the dequantized matmul (bf16, fp16 or fp32).
        device: Where the quantized weights live (``"cpu"`` works with bitsandbytes ≥ 0.48).

    Returns:
        Names of the replaced modules.
    """
    # Names only: holding the modules themselves would keep every replaced 16-bit weight alive until the end.
    replaced = [name for name, module in model.named_modules() if type(module) is nn.Linear and name not in skip]
    for name in replaced:
        replace_with_linear4bit(model, name, compute_dtype, device)
    return replaced


def replace_with_linear4bit(
    model: nn.Module, name: str, compute_dtype: torch.dtype, device: str | torch.device
) -> None:
    """Swap the ``nn.Linear`` called ``name`` for a ``bitsandbytes.nn.Linear4bit`` with its weight quantized to nf4.

    The weight is quantized when it moves to ``device`` (bitsandbytes quantizes on ``.to``); once the old module is
    replaced nothing refers to its full-precision weight any more, so it is freed.
    """
    import bitsandbytes as bnb  # imported here: only QLoRA needs it, and it prints backend warnings on import

    module = model.get_submodule(name)
    quantized = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        module.weight.data.to(compute_dtype),
        requires_grad=False,
        compress_statistics=False,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=quantized,
    )
    if module.bias is not None:
        quantized.bias = nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
    quantized.to(device)  # quantization happens here
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of the ``bitsandbytes.nn.Linear4bit`` modules of ``model``, in module order."""
    import bitsandbytes as bnb

    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def prepare_qlora(model: nn.Module, options: MethodOptions) -> tuple[nn.Module, MethodReport]:
    """Quantize the base to nf4 (:func:`quantize_linear_layers`) and attach LoRA adapters as in :func:`prepare_lora`.

    What stays un-quantized is listed in :data:`QLORA_KEEP_16BIT`; it is stored in ``options.base_dtype`` (the
    compute dtype under mixed precision).
    """
    model.requires_grad_(False)
    if getattr(model, "is_loaded_in_4bit", False):  # built quantized (build_quantized_model): only report it
        quantized = quantized_module_names(model)
    else:
        if options.base_dtype is not None:
            model.to(options.base_dtype)
        quantized = quantize_linear_layers(model, options.compute_dtype, options.device)
        model.to(options.device)
    # PEFT picks its bitsandbytes LoRA layer only for models flagged like transformers' quantizer flags them.
    model.is_loaded_in_4bit = True
    peft_model, report = attach_lora(model, options, "qlora")
    report.quantized_modules = quantized
    report.notes.append("kept 16-bit: " + ", ".join(QLORA_KEEP_16BIT))
    return peft_model, report
