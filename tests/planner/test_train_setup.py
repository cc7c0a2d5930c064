"""The one map from what runs to the planner's step: ``TrainSetup.from_workload``."""

from __future__ import annotations

import pytest

from bench.config import BenchConfig
from phi3v_core.workload import Workload
from planner.estimate import SampleShape, estimate_memory
from planner.shapes import load_shape
from planner.train_setup import TrainSetup

FIELDS = dict(method="full", precision="bf16", attn="sdpa", micro_batch=2, global_batch=8, gradient_checkpointing=False,
              checkpoint_towers="llm", optim="adamw_8bit")  # fmt: skip


@pytest.mark.parametrize("world", [1, 2])
def test_a_workload_a_bench_config_and_a_train_config_map_alike(world: int) -> None:
    from phi3v_core.training import TrainConfig

    train = TrainConfig(**FIELDS, output_dir="unused")
    setups = {
        TrainSetup.from_workload(Workload(**FIELDS), world_size=world),
        TrainSetup.from_workload(BenchConfig(**FIELDS, gpus=world), world_size=world),
        TrainSetup.from_workload(train, world_size=world, zero2=train.uses_deepspeed(world)),
    }
    assert len(setups) == 1
    setup = setups.pop()
    assert (setup.micro_batch, setup.grad_accum, setup.world_size) == (2, 4 // world, world)
    assert (setup.gradient_checkpointing, setup.checkpoint_towers) == (False, "llm")
    assert setup.optim == "adamw_8bit"  # phi3v-finetune's optimizer name went through with_option


def test_zero2_and_the_weights_follow_phi3v_finetune() -> None:
    one = TrainSetup.from_workload(Workload(method="full", precision="bf16"))
    two = TrainSetup.from_workload(Workload(method="full", precision="bf16"), world_size=2)
    lora = TrainSetup.from_workload(Workload(method="lora", precision="bf16"), world_size=2)
    assert (one.zero, one.stored_weight_dtype) == (0, "fp32")  # one process keeps fp32 master weights
    assert (two.zero, two.stored_weight_dtype) == (2, "bf16")  # DeepSpeed casts them to 16-bit
    assert (lora.zero, lora.stored_weight_dtype) == (0, "bf16")  # DDP over a 16-bit base
    offload = TrainSetup.from_workload(Workload(method="full", offload="optimizer"))
    assert offload.offload_optimizer and offload.zero == 2


def test_the_levers_of_the_workload_reach_the_memory_prediction() -> None:
    shape = load_shape("tiny")
    sample = SampleShape.from_images(shape, 4, (672, 672))
    trained = TrainSetup.from_workload(Workload(method="full", precision="bf16"))
    frozen = TrainSetup.from_workload(Workload(method="full", precision="bf16", freeze_llm=True))
    assert frozen.freeze_llm
    assert estimate_memory(shape, frozen, sample).allocated < estimate_memory(shape, trained, sample).allocated
