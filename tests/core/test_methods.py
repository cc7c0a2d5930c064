"""The four methods on the tiny model: exact trainable sets, LoRA targets, QLoRA 4-bit layers, guards."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig
from torch import nn

from phi3v_core.config import get_config
from phi3v_core.errors import ConfigError
from phi3v_core.methods import METHODS, QLORA_SKIP, MethodOptions, get_method, lora_targets
from phi3v_core.methods.base import make_report
from phi3v_core.model import Phi3VForCausalLM

# The tiny model, enumerated by hand: 2 decoder layers; CLIP has 3 layers, the last one (2) is dead.
CLIP = "model.vision_embed_tokens.img_processor.vision_model"
LM_LINEARS = [
    f"model.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
]
CLIP_LIVE_LINEARS = [
    f"{CLIP}.encoder.layers.{i}.{p}"
    for i in (0, 1)
    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
]
PROJECTOR = ["model.vision_embed_tokens.img_projection.0", "model.vision_embed_tokens.img_projection.2"]


def is_dead(name: str) -> bool:
    return name.startswith(f"{CLIP}.encoder.layers.2.") or name.startswith(f"{CLIP}.post_layernorm.")


def lora_param_names(modules: list[str]) -> set[str]:
    return {f"base_model.model.{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}


@pytest.fixture
def tiny() -> Phi3VForCausalLM:
    torch.manual_seed(0)
    return Phi3VForCausalLM(get_config("tiny", attn_implementation="sdpa"))


@pytest.fixture(scope="module")
def batch() -> dict:
    n_img = 144 + 12 + 157  # one 336x336 image: 1x1 crop grid
    ids = torch.cat([torch.tensor([1, 32010]), torch.full((n_img,), -1), torch.arange(100, 112)]).unsqueeze(0)
    labels = ids.clone()
    labels[:, : 2 + n_img] = -100
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.randn(1, 2, 3, 336, 336),
        "image_sizes": [(336, 336)],
    }


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_registry_has_the_recipe_methods_first_and_rejects_unknown() -> None:
    assert list(METHODS)[:4] == ["full", "frozen_vision", "lora", "qlora"]
    assert [m.supports_deepspeed for m in list(METHODS.values())[:4]] == [True, True, False, False]
    assert [m.recipe_name for m in list(METHODS.values())[:4]] == ["full fine-tuning", "frozen image model", "LoRA", "QLoRA"]
    with pytest.raises(ConfigError, match="unknown method 'ia3'.*full, frozen_vision, lora, qlora"):
        get_method("ia3")


def test_importing_the_registry_loads_no_torch() -> None:
    """planner and bench read the entries in light commands: the implementations load on first prepare."""
    import subprocess
    import sys

    code = (
        "import sys, phi3v_core.methods as m; [e.uses_lora for e in m.METHODS.values()]; "
        "print(sorted(k for k in ('torch', 'peft', 'bitsandbytes', 'transformers') if k in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("name", list(METHODS))
def test_each_entry_says_what_its_prepare_trains(name: str) -> None:
    """The facts the planner reads (trains_base, trains_vision, adapter, quantized) match what prepare does."""
    spec = get_method(name)
    if spec.quantized:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model, report = spec.prepare(Phi3VForCausalLM(get_config("tiny")), MethodOptions(lora_rank=2))
    names = trainable(model)
    base = {n for n in names if ".lora_" not in n}  # PEFT's lora_A/B (and DoRA's lora_magnitude_vector)
    assert bool(base) == spec.trains_base
    assert any("vision_embed_tokens" in n for n in base) == spec.trains_vision
    assert report.method == name
    assert bool(report.lora_targets) == spec.uses_lora
    assert bool(report.quantized_modules) == spec.quantized
    assert spec.trace_name in METHODS and not get_method(spec.trace_name).quantized  # a meta build can run it


def test_full_trains_everything_but_the_dead_clip_weights(tiny: Phi3VForCausalLM, batch: dict) -> None:
    names = {n for n, _ in tiny.named_parameters()}
    model, report = get_method("full").prepare(tiny, MethodOptions())
    expected = {n for n in names if not is_dead(n)}
    assert trainable(model) == expected
    assert set(report.frozen_dead) == names - expected and len(report.frozen_dead) == 18
    assert report.trainable_parameters == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    model(**batch).loss.backward()
    # Every trainable parameter gets a gradient: DDP with find_unused_parameters=False is safe.
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_frozen_vision_keeps_the_text_embedding_trainable(tiny: Phi3VForCausalLM, batch: dict) -> None:
    names = {n for n, _ in tiny.named_parameters()}
    model, report = get_method("frozen_vision").prepare(tiny, MethodOptions())
    assert trainable(model) == {n for n in names if not n.startswith("model.vision_embed_tokens.")}
    assert "model.embed_tokens.weight" in trainable(model)  # the recipe freezes it by accident; we do not
    assert any("embed_tokens" in note for note in report.notes)
    model(**batch).loss.backward()
    assert tiny.model.vision_embed_tokens.img_projection[0].weight.grad is None


def test_lora_targets_are_exact_and_skip_the_dead_clip_layer(tiny: Phi3VForCausalLM, batch: dict) -> None:
    options = MethodOptions(lora_rank=4, lora_alpha_ratio=2.0)
    model, report = get_method("lora").prepare(tiny, options)
    expected_modules = LM_LINEARS + ["lm_head"] + CLIP_LIVE_LINEARS + PROJECTOR
    assert sorted(report.lora_targets) == sorted(expected_modules)
    assert trainable(model) == lora_param_names(expected_modules)
    config: LoraConfig = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (4, 8, 0.0, "gaussian")
    # Adapters are fp32 master weights; gaussian init keeps B at zero so the start equals the base model.
    lora_a = model.base_model.model.model.layers[0].self_attn.qkv_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.float32 and lora_a.abs().sum() > 0
    model(**batch).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_lora_with_frozen_vision_and_no_lm_head(tiny: Phi3VForCausalLM) -> None:
    options = MethodOptions(lora_rank=2, freeze_vision=True, lora_lm_head=False)
    model, report = get_method("lora").prepare(tiny, options)
    assert sorted(report.lora_targets) == sorted(LM_LINEARS)
    assert trainable(model) == lora_param_names(LM_LINEARS)


def test_lora_casts_the_frozen_base_to_the_requested_dtype(tiny: Phi3VForCausalLM) -> None:
    model, _ = get_method("lora").prepare(tiny, MethodOptions(lora_rank=2, base_dtype=torch.bfloat16))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"] == torch.float32


def test_lora_target_patterns_do_not_collide() -> None:
    tiny = Phi3VForCausalLM(get_config("tiny"))
    names = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)]
    for target in lora_targets(tiny, MethodOptions()):
        matched = [n for n in names if re.fullmatch(target.pattern, n)]
        assert matched, target
        kind = target.label.split()[-1]
        assert all(n.endswith(kind) for n in matched), (target, matched)
        assert not any(".layers.2." in n and "vision" in n for n in matched)  # dead CLIP layer


def test_a_target_that_matches_nothing_is_a_clear_error(tiny: Phi3VForCausalLM) -> None:
    tiny.lm_head = nn.Identity()  # a model whose names differ from the checkpoint's
    with pytest.raises(ConfigError, match=r"LoRA targets match no linear layer: lm_head"):
        get_method("lora").prepare(tiny, MethodOptions(lora_rank=2))


def test_qlora_holds_real_bitsandbytes_4bit_layers(tiny: Phi3VForCausalLM, batch: dict) -> None:
    import bitsandbytes as bnb

    linear_names = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)]
    options = MethodOptions(lora_rank=4, base_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    model, report = get_method("qlora").prepare(tiny, options)
    assert sorted(report.quantized_modules) == sorted(n for n in linear_names if n not in QLORA_SKIP)
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(four_bit) == len(linear_names) - len(QLORA_SKIP) == 28
    qkv = four_bit["base_model.model.model.layers.0.self_attn.qkv_proj.base_layer"]
    assert qkv.weight.dtype == torch.uint8 and qkv.weight.quant_state.quant_type == "nf4"
    assert qkv.compute_dtype == torch.bfloat16
    assert model.base_model.model.lm_head.base_layer.weight.dtype == torch.bfloat16  # stays 16-bit
    expected_modules = LM_LINEARS + ["lm_head"] + CLIP_LIVE_LINEARS + PROJECTOR
    assert trainable(model) == lora_param_names(expected_modules)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_nothing_trainable_is_refused(tiny: Phi3VForCausalLM) -> None:
    tiny.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        make_report(tiny, "full")


def test_lora_alpha_follows_the_recipe_rounding() -> None:
    assert MethodOptions(lora_rank=64, lora_alpha_ratio=2).lora_alpha == 128
    assert MethodOptions(lora_rank=32, lora_alpha_ratio=0.5).lora_alpha == 16
