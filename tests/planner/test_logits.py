"""The logits + loss term and the lm_head FLOPs under ``TrainSetup.logits`` (supervised positions vs all)."""

from __future__ import annotations

import dataclasses

import pytest

from phi3v_core.constants import LOSS_CHUNK_TOKENS, load_recipe
from phi3v_core.errors import ConfigError
from planner.estimate import SampleShape, activation_terms, estimate_memory
from planner.logits import logit_positions, logits_loss_bytes
from planner.memory_types import GIB
from planner.recommend import task_profiles
from planner.shapes import ModelShape
from planner.speed import flops_per_sample
from planner.train_setup import TrainSetup

PHI35 = ModelShape.preset("phi-3.5-vision")
VOCAB = 32064


def docvqa(answer: int | None = 10) -> SampleShape:
    return SampleShape.from_images(PHI35, 16, (1008, 1680), text_tokens=66, answer_tokens=answer)


def test_docvqa_profile_carries_its_answer_length() -> None:
    assert load_recipe().profiles["docvqa"].answer_tokens == 10
    assert all(task["answer_tokens"] >= 5 for task in task_profiles()["tasks"].values())  # answer + 4 end tokens
    assert docvqa().seq_len == 2443 and docvqa().supervised_tokens == 10


def test_full_logits_keep_the_recipe_term() -> None:
    """``full``: 3 fp32 copies of [micro-batch × sequence × vocabulary] — 0.88 GiB per DocVQA sample, as before."""
    setup = TrainSetup(method="lora", micro_batch=4, logits="full")
    assert logits_loss_bytes(PHI35, setup, docvqa()) == 12 * 4 * 2443 * VOCAB
    assert logits_loss_bytes(PHI35, setup, docvqa()) / 4 / GIB == pytest.approx(0.875, abs=0.001)
    retained = dataclasses.replace(setup, logits_retained=True)
    assert logits_loss_bytes(PHI35, retained, docvqa()) == 16 * 4 * 2443 * VOCAB


def test_supervised_logits_book_the_answer_positions_only() -> None:
    setup = TrainSetup(method="lora", micro_batch=4)
    assert setup.logits == "supervised"
    assert logits_loss_bytes(PHI35, setup, docvqa()) == 12 * 4 * 10 * VOCAB  # 15 MB instead of 3.5 GiB
    full = estimate_memory(PHI35, dataclasses.replace(setup, logits="full"), docvqa())
    supervised = estimate_memory(PHI35, setup, docvqa())
    assert full.phase == "loss backward"
    drop = full.phases["loss backward"] - supervised.phases["loss backward"]
    assert drop == 12 * 4 * (2443 - 10) * VOCAB
    # LoRA at micro-batch 4: the peak moves to the last decoder layer's backward, 1.35 GiB lower
    assert supervised.phase == "LM backward (last layer)"
    assert (full.allocated - supervised.allocated) / GIB == pytest.approx(1.35, abs=0.01)
    # an unknown answer length plans every position as supervised: one full chunk (the conservative side)
    assert logits_loss_bytes(PHI35, setup, docvqa(answer=None)) == 12 * LOSS_CHUNK_TOKENS * VOCAB


def test_long_answers_hold_one_chunk_at_a_time() -> None:
    setup = TrainSetup(method="full", micro_batch=2)
    workload = docvqa(answer=1500)
    assert logit_positions(workload, "supervised") == 1500
    assert activation_terms(PHI35, setup, workload)["logits_loss"] == 12 * LOSS_CHUNK_TOKENS * VOCAB


@pytest.mark.parametrize("method", ["full", "frozen_vision", "lora", "qlora"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_lm_head_flops_over_supervised_positions(method: str, checkpointing: bool) -> None:
    """Model FLOPs drop by the head's forward + backward over the unsupervised positions (LoRA on lm_head too)."""
    setup = TrainSetup(method=method, gradient_checkpointing=checkpointing, lora_rank=64, lora_lm_head=True)
    full = flops_per_sample(PHI35, docvqa(), dataclasses.replace(setup, logits="full"))
    supervised = flops_per_sample(PHI35, docvqa(), setup)
    skipped = 2443 - 10
    head_mult = 2 if method in ("lora", "qlora") else 3  # frozen head: no weight gradient
    adapter = 3 * 2 * 64 * (3072 + VOCAB) if method in ("lora", "qlora") else 0
    expected = (head_mult * 2 * 3072 * VOCAB + adapter) * skipped
    assert full.total - supervised.total == pytest.approx(expected, rel=1e-9)
    assert full.total - supervised.total > 1.0e12 * (2 / 3 if head_mult == 2 else 1)  # ~1 TFLOP per sample
    # checkpointing recomputes the decoder layers, never lm_head: the recompute does not depend on the logits mode
    assert supervised.recompute == pytest.approx(full.recompute, rel=1e-12)
    if checkpointing:
        assert full.recompute > 0


def test_unknown_logits_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="logits"):
        TrainSetup(logits="some")
