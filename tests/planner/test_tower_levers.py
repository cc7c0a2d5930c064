"""The planner's per-tower terms (checkpointing per tower, --freeze_llm), its layout search over them, and
``phi3v-plan --levers``: what each axis is predicted to change, plainly "not modelled" where it is not."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from planner.cli import main
from planner.estimate import SampleShape, activation_terms, model_state_bytes
from planner.layouts import checkpointing_options
from planner.levers import LEVERS
from planner.recommend import PlanRequest, plan
from planner.render import command
from planner.shapes import load_shape
from planner.speed import flops_per_sample
from planner.train_setup import TrainSetup

SHAPE = load_shape("phi-3.5-vision")
WORK = SampleShape.from_images(SHAPE, 16, (1700, 2200), 1, 500)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_decoder_only_checkpointing_sits_between_both_and_off(method: str) -> None:
    base = TrainSetup(method=method, micro_batch=2)
    both, llm, off = (replace(base, gradient_checkpointing=g, checkpoint_towers=t)
                      for g, t in ((True, "both"), (True, "llm"), (False, "both")))
    acts = [sum(activation_terms(SHAPE, s, WORK)[k] for k in ("lm_saved", "vision_saved")) for s in (both, llm, off)]
    assert acts[0] < acts[1] < acts[2]
    recompute = [flops_per_sample(SHAPE, WORK, s).recompute for s in (both, llm, off)]
    assert recompute[0] > recompute[1] > recompute[2] == 0
    vision_only = replace(base, checkpoint_towers="vision")
    assert 0 < flops_per_sample(SHAPE, WORK, vision_only).recompute < recompute[1]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_freeze_llm_keeps_gradients_and_states_for_the_image_path_only(method: str) -> None:
    trained, frozen = TrainSetup(method=method), TrainSetup(method=method, freeze_llm=True)
    a, b = model_state_bytes(SHAPE, trained), model_state_bytes(SHAPE, frozen)
    assert b["gradients"] < a["gradients"] / 4 and b["optimizer_states"] < a["optimizer_states"] / 4
    assert b["weights"] == a["weights"]  # the frozen decoder is still there
    counts = SHAPE.param_counts()
    if method == "full":  # ZeRO-2 on one rank: 16-bit + fp32 gradients of the CLIP tower and projector
        assert b["gradients"] == 6 * (counts.vision + counts.projector - counts.vision_dead)
    assert flops_per_sample(SHAPE, WORK, frozen).language_model < flops_per_sample(SHAPE, WORK, trained).language_model
    with pytest.raises(Exception, match="trains nothing"):
        TrainSetup(method="frozen_vision", freeze_llm=True)


def test_the_search_tries_decoder_only_checkpointing_where_the_image_path_trains() -> None:
    assert (True, "llm") in checkpointing_options(TrainSetup(method="lora"))
    assert (True, "llm") not in checkpointing_options(TrainSetup(method="frozen_vision"))
    result = plan(PlanRequest(methods=("lora",), gpu="A10", count=1))
    layouts = result.method("lora").layouts
    assert {x.checkpoint_towers for x in layouts if x.gradient_checkpointing} == {"both", "llm"}


def test_a_decoder_only_plan_launches_with_that_checkpointing() -> None:
    result = plan(PlanRequest(methods=("lora",), gpu="H100-SXM", count=1))
    mp = replace(result.method("lora"), gradient_checkpointing=True, checkpoint_towers="llm")
    assert "--gradient_checkpointing llm" in command(result.hardware, "docvqa", mp)


def test_levers_prints_each_axis_and_says_not_modelled_plainly(capsys: pytest.CaptureFixture) -> None:
    assert main(["--levers"]) == 0
    text = capsys.readouterr().out
    for lever in LEVERS:
        assert lever.axis in text
    liger = next(x for x in LEVERS if x.axis.startswith("--kernels"))
    assert liger.memory.startswith("not modelled") and liger.speed.startswith("not modelled")
    assert "https://github.com/linkedin/Liger-Kernel" in text and "https://arxiv.org/abs/2410.10989" in text
    assert main(["--levers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["axis"] for r in rows] == [x.axis for x in LEVERS]
    assert all(f["source"].startswith("https://") for r in rows for f in r["figures"])
