"""Closed-form prediction vs torch's MemTracker on real CPU training steps (2 model sizes x 2 methods).

Each case builds a real model, runs a warm-up step and one tracked step (forward, backward, AdamW) and compares the
tracker's peak (allocated tensor bytes) with :func:`planner.estimate.estimate_memory` at CPU overheads (none).
"""

from __future__ import annotations

import pytest
import torch

from phi3v_core.config import get_config
from planner.estimate import SampleShape, estimate_memory
from planner.shapes import ModelShape
from planner.trace import build_batch, measure_step
from planner.train_setup import TrainSetup
from planner.validate import SMALL_SIZE

SMALL = SMALL_SIZE
#: (config overrides, gradient checkpointing, num_crops, image size): tiny with the recipe's checkpointing, small
#: without it so that saved activations, not the logits, dominate the peak.
CASES = {"tiny": ({}, True, 1, (336, 336)), "small": (SMALL, False, 2, (672, 336))}
RANK = 8


def _lora(model: torch.nn.Module, clip_layers: int) -> torch.nn.Module:
    """PEFT LoRA on the recipe's targets, written against the model's module names (live CLIP layers only)."""
    from peft import LoraConfig, get_peft_model

    live = "|".join(str(i) for i in range(clip_layers - 1))
    clip = r"model\.vision_embed_tokens\.img_processor\.vision_model\.encoder\.layers"
    target = (
        r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))|lm_head"
        rf"|{clip}\.({live})\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
        r"|model\.vision_embed_tokens\.img_projection\.[02]"
    )
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=target))


@pytest.mark.parametrize("logits", ["supervised", "full"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("size", sorted(CASES))
def test_prediction_matches_memtracker(size, method, logits):
    from phi3v_core.model import Phi3VForCausalLM

    overrides, checkpointing, num_crops, image_size = CASES[size]
    config = get_config("tiny", **overrides)
    shape = ModelShape.from_config(config, size)
    model = Phi3VForCausalLM(config)
    model.supervised_logits = logits == "supervised"
    if method == "full":
        dead = model.dead_parameter_names()
        for name, param in model.named_parameters():
            param.requires_grad_(name not in dead)
    else:
        model = _lora(model, shape.vision_layers)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == shape.lora_params(RANK)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    workload = SampleShape.from_images(
        shape, num_crops=num_crops, image_size=image_size, text_tokens=40, answer_tokens=32
    )
    setup = TrainSetup(
        logits=logits,
        method=method,
        precision="fp32",
        attn="sdpa",
        gradient_checkpointing=checkpointing,
        lora_rank=RANK,
        optimizer_foreach=False,
        zero_stage=0,
    )
    measured = measure_step(model, build_batch(shape, workload), setup)["peak"]["Total"]
    predicted = estimate_memory(shape, setup, workload).allocated
    error = predicted / measured - 1
    print(f"{size} {method} {logits}: measured {measured / 2**20:.1f} MiB, predicted {predicted / 2**20:.1f} MiB ({error:+.1%})")
    assert abs(error) <= 0.10


def test_8bit_adamw_prediction_matches_memtracker():
    """bitsandbytes' 8-bit AdamW states (1 B each for m and v + an fp32 absmax per 256) against the closed form."""
    from planner.validate import eight_bit_adamw_memory

    result = eight_bit_adamw_memory()  # the README's stored figure (results/validation/) comes from the same function
    measured, predicted = result["measured_peak_bytes"], result["predicted_peak_bytes"]
    plain = result["predicted_plain_adamw_bytes"]
    error = predicted / measured - 1
    print(f"small full 8-bit AdamW: measured {measured / 2**20:.1f} MiB, predicted {predicted / 2**20:.1f} MiB "
          f"({error:+.1%}); plain AdamW predicted {plain / 2**20:.1f} MiB")  # fmt: skip
    assert abs(error) <= 0.10
    assert plain > predicted  # the 8-bit states are what is saved
