"""QLoRA bases built layer by layer into nf4 (``build_quantized_model``) equal a 16-bit build quantized afterwards."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit

from phi3v_core.config import get_config
from phi3v_core.device import default_dtype
from phi3v_core.methods import (
    QLORA_SKIP,
    build_quantized_model,
    get_method,
    layer_units,
    quantize_linear_layers,
)
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.training import Machine, TrainConfig, build_model, prepare_model

BF16 = torch.bfloat16


def _layer_by_layer(seed: int = 0) -> tuple[Phi3VForCausalLM, list[str]]:
    config = get_config("tiny", attn_implementation="sdpa")
    torch.manual_seed(seed)
    return build_quantized_model(lambda: Phi3VForCausalLM(config), BF16, BF16, "cpu")


@pytest.fixture(scope="module")
def pair() -> tuple[Phi3VForCausalLM, list[str], Phi3VForCausalLM, list[str]]:
    """(16-bit build quantized afterwards, its quantized names, layer-by-layer build, its quantized names)."""
    torch.manual_seed(0)
    with default_dtype(BF16):
        reference = Phi3VForCausalLM(get_config("tiny", attn_implementation="sdpa"))
    reference_names = quantize_linear_layers(reference, BF16, "cpu")
    return (reference, reference_names, *_layer_by_layer())


def test_same_modules_are_4bit_and_the_same_stay_16bit(pair) -> None:
    reference, reference_names, built, names = pair
    assert names == reference_names and len(names) == 28 and "lm_head" in QLORA_SKIP
    assert {n: type(m) for n, m in built.named_modules()} == {n: type(m) for n, m in reference.named_modules()}
    params = dict(built.named_parameters())
    for name, expected in reference.named_parameters():
        assert (params[name].dtype, params[name].shape) == (expected.dtype, expected.shape), name
    assert built.lm_head.weight.dtype == BF16 and built.model.embed_tokens.weight.dtype == BF16
    assert built.is_loaded_in_4bit
    assert sorted(layer_units(built)) == sorted(layer_units(reference)) and len(layer_units(built)) == 2 + 3


def test_buffers_equal_and_every_weight_initialised_like_a_normal_build(pair) -> None:
    """Same buffers (rotary frequencies, CLIP position ids); each weight has the normal build's init scale.

    A weight left uninitialised (``to_empty`` garbage) or initialised by the wrong rule (CLIP's scales differ from
    the decoder's 0.02) would change its spread far beyond the 20 % allowed for two random draws.
    """
    reference, reference_names, built, _ = pair
    buffers = dict(built.named_buffers())
    for name, expected in reference.named_buffers():
        assert torch.equal(buffers[name], expected), name
    params = dict(built.named_parameters())
    for name, expected in reference.named_parameters():
        value, expected = params[name].detach(), expected.detach()
        if isinstance(value, bnb.nn.Params4bit):
            value, expected = (
                dequantize_4bit(value.data, value.quant_state),
                dequantize_4bit(expected.data, expected.quant_state),
            )
        assert torch.isfinite(value).all(), name
        if value.numel() >= 1000:
            assert value.float().std().item() == pytest.approx(expected.float().std().item(), rel=0.2), name
        elif value.numel() > 1 and expected.float().std() == 0:
            assert torch.equal(value, expected), name  # norms (ones) and biases (zeros)


def test_seeded_builds_are_identical() -> None:
    first, _ = _layer_by_layer(seed=3)
    second, _ = _layer_by_layer(seed=3)
    other, _ = _layer_by_layer(seed=4)
    a, b, c = (dict(m.named_parameters()) for m in (first, second, other))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.layers.0.mlp.gate_up_proj.weight"], c["model.layers.0.mlp.gate_up_proj.weight"])


def test_qlora_preset_is_built_quantized_and_trains(tmp_path) -> None:
    cpu = Machine(cuda=False)
    cfg = TrainConfig(method="qlora", precision="bf16", lora_rank=4, output_dir=str(tmp_path))
    base = build_model(cfg, cpu)
    assert base.is_loaded_in_4bit and isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    model, report = prepare_model(cfg, cpu)
    linear_names = [n for n, m in Phi3VForCausalLM(get_config("tiny")).named_modules() if type(m) is torch.nn.Linear]
    assert sorted(report.quantized_modules) == sorted(n for n in linear_names if n not in QLORA_SKIP)
    assert report.trainable_parameters > 0 and get_method("qlora").quantized
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
