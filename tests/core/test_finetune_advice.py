"""phi3v-finetune's advice line (issue #26 §2): the measured peak against the card and the phi3v-plan command that
ranks the layouts (the core cannot consult the planner itself)."""

from __future__ import annotations

from phi3v_core.training import TrainConfig
from phi3v_core.training.advice import memory_advice

GIB = 1 << 30


def _train(**values: object) -> TrainConfig:
    return TrainConfig(model="phi-3.5-vision", method="lora", output_dir="unused", num_crops=16, global_batch=64,
                       micro_batch=1, **values)


def test_a_run_that_left_the_card_half_empty_gets_the_plan_command() -> None:
    line = memory_advice(_train(), "docvqa", None, 45 * GIB, 80 * GIB)
    assert line.startswith("peak 45.0 of 80.0 GiB at micro-batch 1, checkpointing on: ")
    assert line.endswith("phi3v-plan --method lora --num_crops 16 --batch_size 64 --task docvqa predicts the "
                         "fastest layout for this card")
    assert "--data mydata" in memory_advice(_train(), "jsonl", "mydata", 10 * GIB, 80 * GIB)


def test_no_advice_for_a_well_used_card_or_a_cpu() -> None:
    assert memory_advice(_train(), "docvqa", None, 70 * GIB, 80 * GIB) is None
    assert memory_advice(_train(), "docvqa", None, None, None) is None
