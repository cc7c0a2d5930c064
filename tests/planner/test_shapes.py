"""Model shapes and parameter counts agree with phi3v_core's config and model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from phi3v_core.config import MODEL_PRESETS, get_config
from phi3v_core.methods import METHOD_NAMES, METHODS
from planner.shapes import ModelShape, hd_crop_grid, image_token_count, load_shape


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_preset_table_matches_get_config(preset):
    from_config = ModelShape.from_config(get_config(preset), name=preset)
    assert ModelShape.preset(preset) == from_config


def test_checkpoint_config_json_is_read_without_transformers(ckpt35):
    shape = load_shape(str(ckpt35))
    assert dataclasses.replace(shape, name="x") == dataclasses.replace(ModelShape.preset("phi-3.5-vision"), name="x")


def test_official_parameter_count():
    counts = ModelShape.preset("phi-3.5-vision").param_counts()
    assert counts.total == 4_146_621_440  # the checkpoint index (2 B x total_size)
    assert counts.language_model == 3_821_079_552
    assert counts.vision == 303_507_456
    assert counts.vision_dead == 12_598_272
    assert counts.projector == 22_034_432


@pytest.mark.parametrize("preset", ["tiny", "phi-3.5-vision"])
def test_counts_match_the_model_built_on_meta(preset):
    from phi3v_core.model import Phi3VForCausalLM

    with torch.device("meta"):
        model = Phi3VForCausalLM(get_config(preset))
    shape = ModelShape.preset(preset)
    counts = shape.param_counts()
    assert counts.total == sum(p.numel() for p in model.parameters())
    dead = model.dead_parameter_names()
    assert counts.vision_dead == sum(p.numel() for n, p in model.named_parameters() if n in dead)
    skip = {"lm_head"}  # phi3v_core.methods.QLORA_SKIP
    linear = sum(m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in skip)
    assert counts.quantizable() == linear


@pytest.mark.parametrize("freeze_vision", [False, True])
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if METHODS[m].uses_lora and not METHODS[m].quantized])
def test_adapter_parameter_count_matches_the_method(method, freeze_vision):
    """The planner's count of each adapter method's trainable parameters (its ``Adapter.params`` terms)."""
    from phi3v_core.methods import MethodOptions, get_method
    from phi3v_core.model import Phi3VForCausalLM

    model = Phi3VForCausalLM(get_config("tiny"))
    _, report = get_method(method).prepare(model, MethodOptions(lora_rank=4, freeze_vision=freeze_vision))
    shape = ModelShape.preset("tiny")
    adapter = METHODS[method].adapter
    assert report.trainable_parameters == shape.lora_params(4, lm_head=True, vision=not freeze_vision, adapter=adapter)


# Hand-derived from the HD rule (the width is scaled to s·336 with s·ceil(s·h/w) <= num_crops, the height padded up to
# a multiple of 336) and 144·hc·wc + 12·hc + 157; e.g. 640×480 at 9 crops: s = 3 (3·ceil(2.25) = 9), height 756 pads
# to 1008, so a 3×3 grid: 1296 + 36 + 157 = 1489.
HAND_DERIVED = [
    ((1024, 768), 16, (3, 4), 1921),
    ((768, 1024), 16, (4, 3), 1933),
    ((2000, 500), 16, (2, 8), 2485),
    ((2000, 500), 4, (1, 4), 745),
    ((320, 240), 4, (2, 2), 757),
    ((1008, 1680), 16, (5, 3), 2377),
    ((336, 336), 1, (1, 1), 313),
    ((640, 480), 9, (3, 3), 1489),
]


@pytest.mark.parametrize(("size", "num_crops", "grid", "tokens"), HAND_DERIVED)
def test_planner_and_processor_token_counts_equal_hand_derived_ones(size, num_crops, grid, tokens):
    from phi3v_core.processing import Phi3VImageProcessor

    assert hd_crop_grid(*size, num_crops) == grid
    assert image_token_count(*grid) == tokens
    assert Phi3VImageProcessor(num_crops=num_crops).num_image_tokens(*size) == tokens


def test_spec_token_examples():
    # hand-derived: 144·hc·wc + 12·hc + 157
    assert image_token_count(*hd_crop_grid(1024, 768, 16)) == 1921
    assert image_token_count(*hd_crop_grid(768, 1024, 16)) == 1933
    assert image_token_count(*hd_crop_grid(2000, 500, 16)) == 2485
    assert image_token_count(*hd_crop_grid(1344, 1344, 16)) == 2509
